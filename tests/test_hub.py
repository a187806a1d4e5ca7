"""Model card, Hub ids and Hub upload (against the suite's recording fake of HfApi)."""

from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from transformers import ViTMAEConfig

from modeling_ldae import JOURNEY_STAGES, LDAEConfig, hub


def _write(root: Path, relative: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(relative)


def test_model_card_metadata_and_results_load_back_as_written(tmp_path):
    hub_data, local_data = hub.CardDataset.of("uoft-cs/cifar10", "test"), hub.CardDataset.of(tmp_path / "my-images",
                                                                                              "validation")
    written = [
        hub.accuracy_result(0.41, "k-NN top-1 accuracy", "k-NN classification", hub_data, k=20, temperature=0.07,
                            bank_size=5000, query_size=1000),
        hub.accuracy_result(0.91234, "Top-1 accuracy", "Fine-tuning", local_data, num_examples=500),
        hub.accuracy_result(0.99, "Top-5 accuracy", "Fine-tuning", local_data, top_k=5, num_examples=500),
    ]
    hub.write_model_card(
        tmp_path, model_name="someone/ldae-vit-b-cifar10", config=LDAEConfig(**JOURNEY_STAGES["2d"]),
        base_model="someone/ldae-vit-b", datasets=["uoft-cs/cifar10"], pipeline_tag="image-classification",
        tags=["ldae", "vision"], description="l-DAE ViT-B fine-tuned on CIFAR-10.", eval_results=written,
        figures={"eval_top1": 0.91234}, training_arguments={"learning_rate": 4e-3, "output_dir": Path("out")},
    )

    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "transformers",
                                                                   "image-classification")
    assert data.base_model == "someone/ldae-vit-b" and data.datasets == ["uoft-cs/cifar10"]
    assert data.tags == ["ldae", "vision", "arxiv:2401.14404"] and data.model_name == "someone/ldae-vit-b-cifar10"
    assert len(data.eval_results) == len(written)
    for loaded, expected in zip(data.eval_results, written):
        assert (loaded.task_type, loaded.task_name, loaded.metric_type, loaded.metric_name, loaded.metric_value) == (
            expected.task_type, expected.task_name, expected.metric_type, expected.metric_name, expected.metric_value)
        assert (loaded.dataset_type, loaded.dataset_name, loaded.dataset_split) == (
            expected.dataset_type, expected.dataset_name, expected.dataset_split)
        assert loaded.metric_args == expected.metric_args
    knn, top1, top5 = data.eval_results
    assert (knn.dataset_type, knn.dataset_split, knn.metric_type, knn.metric_value) == ("uoft-cs/cifar10", "test",
                                                                                         "accuracy", 0.41)
    assert knn.metric_args == {"k": 20, "temperature": 0.07, "bank_size": 5000, "query_size": 1000}
    assert (top1.dataset_type, top1.dataset_name, top1.dataset_split) == ("imagefolder", "my-images", "validation")
    assert (top1.metric_type, top5.metric_type) == ("accuracy", "top_5_accuracy")
    # Usage with and without the package, what loading needs, the paper.
    text = card.text
    assert 'pipeline("image-classification", model="someone/ldae-vit-b-cifar10", trust_remote_code=True)' in text
    assert 'import modeling_ldae\nfrom transformers import pipeline' in text
    transformers_floor = hub.declared_requirement("transformers")
    assert transformers_floor.startswith("transformers>=") and f"`{transformers_floor}`" in text
    assert "needs `diffusers`" in text and "ldae[diffusers]" in text
    assert "https://arxiv.org/abs/2401.14404" in text and "@inproceedings{chen2025deconstructing" in text
    assert "| eval_top1 | 0.9123 |" in text and '"learning_rate": 0.004' in text and '"output_dir": "out"' in text


def test_a_baseline_card_has_no_remote_code_paper_or_results(tmp_path):
    hub.write_model_card(
        tmp_path, model_name="mae-tiny", config=ViTMAEConfig(), pipeline_tag="image-feature-extraction", tags=[],
        description="", figures={}, training_arguments={},
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and card.data.datasets is None and card.data.eval_results is None
    assert card.data.license == "apache-2.0" and card.data.tags == []
    assert 'AutoModel.from_pretrained("mae-tiny")' in card.text and "trust_remote_code" not in card.text
    assert "diffusers" not in card.text and "bibtex" not in card.text


def test_push_to_hub_uploads_model_files_only(tmp_path, hub_calls):
    model_files = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "logs/metrics.json"]
    for name in model_files + ["checkpoint-500/model.safetensors", "checkpoint-500/optimizer.pt",
                               "runs/checkpoint-1/x", ".tmp-checkpoint-7/x", ".tmp-final-1234/config.json"]:
        _write(tmp_path, name)

    info = hub.push_to_hub(tmp_path, "user/ldae", token="tok", private=True, commit_message="msg")

    assert info.commit_url == "https://huggingface.co/user/ldae/commit/0"
    (_, init), (_, create), (_, upload) = hub_calls
    assert init == {"token": "tok"}
    assert create["repo_id"] == "user/ldae" and create["exist_ok"] and create["private"] is True
    assert upload["repo_id"] == "user/ldae" and upload["commit_message"] == "msg"
    assert upload["folder_path"] == tmp_path
    assert upload["files"] == sorted(model_files)


def test_hub_ids_are_checked_once_for_metadata_and_upload(tmp_path):
    assert hub.hub_id("ILSVRC/imagenet-1k") == "ILSVRC/imagenet-1k"
    assert hub.hub_id(str(tmp_path)) is None and hub.hub_id("./data") is None and hub.hub_id(None) is None
    assert hub.repo_id(None, tmp_path / "ldae-run") == "ldae-run"
    assert hub.repo_id("me/ldae", tmp_path) == "me/ldae"
    with pytest.raises(hub.InputError, match="--hub_model_id 'me/a b' is not a valid Hub repository id"):
        hub.repo_id("me/a b", tmp_path)


def test_a_bare_repository_name_uploads_to_the_token_owners_namespace(tmp_path, hub_calls):
    _write(tmp_path, "config.json")
    hub.push_to_hub(tmp_path, hub.repo_id(None, tmp_path / "ldae-run"))
    (_, _), (_, create), (_, upload) = hub_calls
    assert create["repo_id"] == "ldae-run" and upload["repo_id"] == "token-owner/ldae-run"
