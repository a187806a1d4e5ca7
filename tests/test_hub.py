"""Model card, Hub ids and Hub upload (against the suite's recording fake of HfApi)."""

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from modeling_ldae import hub


def _write(root: Path, relative: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(relative)


def test_model_card_metadata_round_trips(tmp_path):
    hub.write_model_card(
        tmp_path,
        model_name="ldae-vit-b-cifar10",
        base_model="someone/ldae-vit-b",
        datasets=["uoft-cs/cifar10"],
        pipeline_tag="image-classification",
        tags=["ldae", "vision"],
        description="l-DAE ViT-B fine-tuned on CIFAR-10.",
        training_arguments={"learning_rate": 4e-3, "num_train_epochs": 100, "output_dir": Path("out")},
        results={"top1": 0.91234, "top5": 0.99},
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.base_model == "someone/ldae-vit-b"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.tags == ["ldae", "vision"]
    assert "# ldae-vit-b-cifar10" in card.text
    assert "| top1 | 0.9123 |" in card.text
    assert '"learning_rate": 0.004' in card.text and '"output_dir": "out"' in card.text


def test_model_card_omits_absent_base_model(tmp_path):
    hub.write_model_card(
        tmp_path, model_name="m", pipeline_tag="image-feature-extraction", tags=[], description="",
        training_arguments={}, results={},
    )
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model is None and data.datasets is None


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
