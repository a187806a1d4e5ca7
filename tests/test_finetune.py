"""run_finetune.py end to end on real CIFAR-10 images and the shared tiny checkpoint: merged model, layer-wise lr
decay under the Trainer's schedule, MixUp/CutMix soft targets, EMA (saved) and both accuracies, `pipeline`,
streaming, the push, argument files and one-line errors."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from conftest import check_classifier_card, recording_hub, write_cifar_subset
from modeling_ldae import LDAEConfig, LDAEForImageClassification
from modeling_ldae.classification import ClassificationTrainer, FineTuneTrainingArguments, soft_target_cross_entropy
from modeling_ldae.data import decode_image
from modeling_ldae.optim import layer_decay_param_groups, steps_from_epochs
from run_finetune import main

NUM_TRAIN, NUM_EVAL, BATCH = 256, 128, 64
STEPS = steps_from_epochs(NUM_TRAIN, BATCH, 1)
LR = 1e-3 * BATCH / 256  # base lr 1e-3 x batch / 256
EMA_DECAY = 0.9  # short run: a decay whose average visibly moves


@pytest.fixture(scope="module")
def cifar_small(cifar10_dir, tmp_path_factory) -> Path:
    return write_cifar_subset(cifar10_dir, tmp_path_factory.mktemp("cifar_small"), NUM_TRAIN, NUM_EVAL)


def finetune_argv(checkpoint: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint), "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir.parent / "cache"), "--do_train", "--do_eval",
        "--per_device_train_batch_size", str(BATCH), "--per_device_eval_batch_size", str(BATCH),
        "--num_train_epochs", "1", "--warmup_epochs", "1", "--save_steps", "1", "--logging_steps", "1",
        "--model_ema_decay", str(EMA_DECAY), "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
        "--seed", "0", *extra,
    ]


@pytest.fixture(scope="module")
def finetune_run(tiny_checkpoint, cifar_small, tmp_path_factory) -> tuple[Path, dict, list]:
    """The fine-tuning run, pushed to the recording fake of the Hub; its calls come third."""
    output_dir = tmp_path_factory.mktemp("finetune") / "out"
    with recording_hub() as hub_calls:
        results = main(finetune_argv(tiny_checkpoint, cifar_small, output_dir, "--push_to_hub", "--hub_model_id",
                                     "someone/ldae-tiny-finetuned"))
    return output_dir, results, hub_calls


def test_layer_decay_is_each_groups_effective_lr(finetune_run):
    output_dir, _, _ = finetune_run
    model = LDAEForImageClassification.from_pretrained(output_dir)
    depth = model.config.num_hidden_layers
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in layer_decay_param_groups(model, LR, 0.05, 0.75)]
    saved = torch.load(output_dir / "checkpoint-1" / "optimizer.pt", weights_only=False)["param_groups"]
    assert [len(g["params"]) for g in saved] == [len(g) for g in groups]

    def layer(name: str) -> int:  # 0 stem, 1..depth blocks, depth + 1 head (0.75 for a ViT-sized neither B nor L)
        if name.startswith("ldae.embeddings."):
            return 0
        return int(name.split(".")[2]) + 1 if name.startswith("ldae.blocks.") else depth + 1

    warmup = steps_from_epochs(NUM_TRAIN, BATCH, 1)
    for group, group_names in zip(saved, groups):
        scales = {0.75 ** (depth + 1 - layer(name)) for name in group_names}
        assert len(scales) == 1 and group["lr_scale"] == pytest.approx(scales.pop())
        # After one scheduler step of the linear warm-up: 1 / warmup of the group's peak.
        assert group["lr"] == pytest.approx(LR * group["lr_scale"] / warmup)
        assert group["weight_decay"] == (0.05 if all(n.endswith("weight") and "norm" not in n for n in group_names)
                                         else 0.0)
    assert {layer(n) for g in groups for n in g} == set(range(depth + 2))


def test_saved_model_is_merged_single_label_with_ema_weights(finetune_run):
    output_dir, results, _ = finetune_run
    config = LDAEConfig.from_pretrained(output_dir)
    assert config.time_conditioning_merged and config.merged_timestep == config.feature_timestep
    assert config.classifier_head == "fine_tune" and config.drop_path_rate == 0.1
    assert config.problem_type in (None, "single_label_classification")
    saved = load_file(output_dir / "model.safetensors")
    last = output_dir / f"checkpoint-{STEPS}"
    ema, raw = load_file(last / "ema" / "model.safetensors"), load_file(last / "model.safetensors")
    previous_ema = load_file(output_dir / f"checkpoint-{STEPS - 1}" / "ema" / "model.safetensors")
    key = "classifier.weight"
    assert torch.equal(saved[key], ema[key]) and not torch.equal(saved[key], raw[key])
    for key in ("classifier.weight", "ldae.blocks.0.mlp.fc1.weight"):
        torch.testing.assert_close(ema[key], EMA_DECAY * previous_ema[key] + (1 - EMA_DECAY) * raw[key])
    stored = json.loads((output_dir / "all_results.json").read_text())
    for name in ("eval_top1", "eval_top5", "eval_without_ema_top1", "eval_without_ema_top5"):
        assert 0 <= stored[name] == results[name] <= 1
    predictions = [json.loads(line) for line in (output_dir / "eval_predictions.jsonl").read_text().splitlines()]
    assert results["eval_top1"] == pytest.approx(np.mean([p["top5"][0] == p["label"] for p in predictions]))


def test_push_uploads_our_card_and_the_model_without_checkpoints(finetune_run, cifar_small):
    _, results, hub_calls = finetune_run
    (_, create), (_, upload) = hub_calls[1:]
    assert create["repo_id"] == upload["repo_id"] == "someone/ldae-tiny-finetuned"
    assert "README.md" in upload["files"] and "model.safetensors" in upload["files"]
    assert not [name for name in upload["files"] if "checkpoint-" in name]
    card = (Path(upload["folder_path"]) / "README.md").read_text()
    assert "- fine-tune" in card and "End-to-end fine-tuning (MAE protocol)" in card
    assert f"| eval_without_ema_top1 | {results['eval_without_ema_top1']:.4f} |" in card
    # The model-index holds the saved (EMA) weights' eval_top1 / eval_top5.
    check_classifier_card(Path(upload["folder_path"]) / "README.md", results, "Fine-tuning (MAE protocol)", cifar_small)


def test_output_folder_works_in_pipeline(finetune_run, cifar_small):
    output_dir, _, _ = finetune_run
    rows = pq.read_table(cifar_small / "test-00000-of-00001.parquet").slice(0, 16).to_pylist()
    images = [decode_image(row["img"]) for row in rows]
    predicted = [result[0]["label"] for result in pipeline("image-classification", model=str(output_dir))(images)]
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    with torch.no_grad():
        logits = model(**AutoImageProcessor.from_pretrained(output_dir)(images, return_tensors="pt")).logits
    assert predicted == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_mixup_cutmix_give_soft_targets_and_soft_target_loss(tiny_checkpoint, cifar10_train_images, tmp_path):
    classes = [str(i) for i in range(10)]
    model = LDAEForImageClassification.from_pretrained(
        tiny_checkpoint, id2label=dict(enumerate(classes)), classifier_head="fine_tune"
    ).merge_time_conditioning()
    seen = []

    def recording_loss(outputs, labels, num_items_in_batch=None):
        seen.append((outputs["logits"].detach(), labels))
        return soft_target_cross_entropy(outputs, labels, num_items_in_batch)

    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    args = FineTuneTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = ClassificationTrainer(model=model, args=args, compute_loss_func=recording_loss, mixup=mixup)
    images, labels = cifar10_train_images[0][:8].clone(), torch.arange(8)  # flipped pairs hold distinct classes
    np.random.seed(0)  # timm draws lambda and MixUp-or-CutMix from numpy
    loss = trainer.compute_loss(model.train(), {"pixel_values": images.clone(), "labels": labels})
    logits, targets = seen[-1]
    assert targets.dtype == torch.float32 and targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(-1), torch.ones(8))
    assert (targets >= 0.01 - 1e-6).all()  # label smoothing 0.1 over 10 classes
    assert ((targets > 0.05).sum(-1) == 2).all()  # each row mixes its class with its partner's
    torch.testing.assert_close(loss, SoftTargetCrossEntropy()(logits, targets))
    assert model.config.problem_type is None  # soft targets never reach the model's own loss
    eval_loss = trainer.compute_loss(model.eval(), {"pixel_values": images.clone(), "labels": labels})
    assert seen[-1][1].dtype == torch.long
    torch.testing.assert_close(eval_loss, torch.nn.functional.cross_entropy(seen[-1][0], labels))


def test_streamed_finetune_counts_steps_from_epochs(tiny_checkpoint, cifar_small, tmp_path):
    output_dir = tmp_path / "out"
    results = main(finetune_argv(
        tiny_checkpoint, cifar_small, output_dir, "--streaming", "--max_train_samples", "128", "--max_eval_samples",
        "32", "--shuffle_buffer_size", "0", "--save_strategy", "no", "--mixup_alpha", "0", "--cutmix_alpha", "0",
        "--model_ema", "false",
    ))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["max_steps"] == state["global_step"] == steps_from_epochs(128, BATCH, 1)
    assert results["train_samples"] == 128 and results["eval_samples"] == 32
    assert "eval_without_ema_top1" not in results


def test_argument_file_gives_required_flags_and_later_flags_override_it(tiny_checkpoint, cifar_small, tmp_path):
    # Evaluation only: the file alone must get past argparse's check of --model_name_or_path.
    arguments = tmp_path / "finetune.json"
    arguments.write_text(json.dumps({
        "model_name_or_path": str(tiny_checkpoint), "dataset_name": str(cifar_small),
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "do_eval": True,
        "max_eval_samples": 8, "per_device_eval_batch_size": 16, "dataloader_pin_memory": False, "disable_tqdm": True,
    }))
    results = main([str(arguments), "--max_eval_samples", "16"])
    assert results["eval_samples"] == 16 and results["protocol"] == "fine_tune"
    assert "eval_without_ema_top1" not in results  # nothing trained: no EMA to compare


def test_non_ldae_checkpoint_is_one_line(cifar_small, tmp_path, capsys):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(SystemExit) as exit_info:
        main(finetune_argv(tmp_path / "vit", cifar_small, tmp_path / "out"))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"run_finetune.py: error: --model_name_or_path '{tmp_path / 'vit'}' is a 'vit' checkpoint "
                      "(ViTConfig), not an l-DAE one (model_type 'ldae'): pass an l-DAE pre-training or "
                      "classification checkpoint."]


@pytest.mark.parametrize(
    ("file_text", "message"),
    [("learning_rate_typo: 0.1\n", r"unknown argument\(s\) learning_rate_typo; see `run_finetune.py --help`"),
     ("- model_name_or_path\n", r"holds a list, not a mapping of argument names to values"),
     ("model_name_or_path: [unclosed\n", r"is not valid YAML/JSON .*: fix the file")],
)
def test_bad_argument_file_is_one_line(file_text, message, tmp_path, capsys):
    arguments = tmp_path / "finetune.yaml"
    arguments.write_text(file_text)
    with pytest.raises(SystemExit) as exit_info:
        main([str(arguments)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("run_finetune.py: error: ")
    assert re.search(message, errors[0]), errors[0]
