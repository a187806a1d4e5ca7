"""run_linear_probe.py end to end on real CIFAR-10 images and the shared tiny checkpoint: frozen backbone, LARS,
cached features, resume, the output folder in `pipeline`, two processes on a stream, and each bad input."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, pipeline

from conftest import check_classifier_card, recording_hub, write_cifar_subset
from modeling_ldae import LDAEConfig, LDAEForImageClassification, LDAEForPreTraining
from modeling_ldae.data import decode_image
from modeling_ldae.optim import steps_from_epochs
from run_linear_probe import main

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_EVAL, BATCH, EPOCHS = 256, 128, 64, 2
STEPS = steps_from_epochs(NUM_TRAIN, BATCH, EPOCHS)
LR = 0.1 * BATCH / 256  # base lr 0.1 x batch / 256
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def probe_argv(checkpoint: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint), "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir.parent / "cache"), "--do_train", "--do_eval",
        "--per_device_train_batch_size", str(BATCH), "--per_device_eval_batch_size", str(BATCH),
        "--num_train_epochs", str(EPOCHS), "--warmup_epochs", "0", "--save_steps", "1", "--logging_steps", "1",
        "--dataloader_pin_memory", "false", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]


def eval_images(data: Path, count: int):
    rows = pq.read_table(data / "test-00000-of-00001.parquet").slice(0, count).to_pylist()
    return [decode_image(row["img"]) for row in rows], [row["label"] for row in rows]


def read_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def read_predictions(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "eval_predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cifar_small(cifar10_dir, tmp_path_factory) -> Path:
    return write_cifar_subset(cifar10_dir, tmp_path_factory.mktemp("cifar_small"), NUM_TRAIN, NUM_EVAL)


@pytest.fixture(scope="module")
def probe_run(tiny_checkpoint, cifar_small, tmp_path_factory) -> tuple[Path, dict, list]:
    """The augmented probe, pushed to the recording fake of the Hub; its calls come third."""
    output_dir = tmp_path_factory.mktemp("probe") / "out"
    with recording_hub() as hub_calls:
        results = main(probe_argv(tiny_checkpoint, cifar_small, output_dir,
                                  "--push_to_hub", "--hub_model_id", "someone/ldae-tiny-probe"))
    return output_dir, results, hub_calls


@pytest.fixture(scope="module")
def cached_run(tiny_checkpoint, cifar_small, tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("cached") / "out"
    return output_dir, main(probe_argv(tiny_checkpoint, cifar_small, output_dir, "--cache_features"))


@pytest.mark.floor
def test_probe_trains_only_the_head(probe_run, tiny_checkpoint):
    output_dir, results, _ = probe_run
    pretrained = load_file(tiny_checkpoint / "model.safetensors")
    probed = load_file(output_dir / "model.safetensors")
    config = LDAEConfig.from_pretrained(output_dir)
    backbone = [key for key in probed if key.startswith("ldae.")]
    assert backbone and config.classifier_head == "linear_probe"
    for key in backbone:  # bit-identical, and the encoder is the first num_hidden_layers blocks
        assert torch.equal(probed[key], pretrained[key]), key
    assert not any(key.startswith(f"ldae.blocks.{config.num_hidden_layers}.") for key in probed)
    assert sorted(k for k in probed if not k.startswith("ldae.")) == [
        "classifier.bias", "classifier.weight", "fc_norm.num_batches_tracked", "fc_norm.running_mean",
        "fc_norm.running_var"]
    first = load_file(output_dir / "checkpoint-1" / "model.safetensors")
    assert not torch.equal(first["classifier.weight"], probed["classifier.weight"])
    assert probed["fc_norm.num_batches_tracked"].item() == STEPS
    optimizer = torch.load(output_dir / "checkpoint-1" / "optimizer.pt", weights_only=False)
    shapes = sorted(tuple(state["momentum_buffer"].shape) for state in optimizer["state"].values())
    assert shapes == [(10,), (10, config.hidden_size)]  # only the head is optimised
    assert results["probe_mode"] == "augmented" and results["train_samples"] == NUM_TRAIN


def test_lars_adapts_the_head_update(probe_run):
    output_dir, _, _ = probe_run
    after = load_file(output_dir / "checkpoint-1" / "model.safetensors")["classifier.weight"]
    optimizer = torch.load(output_dir / "checkpoint-1" / "optimizer.pt", weights_only=False)
    assert torch.load(output_dir / "checkpoint-1" / "scheduler.pt")["base_lrs"] == pytest.approx([LR, LR])
    weight_group = next(g for g in optimizer["param_groups"] if g["always_adapt"])
    momentum = optimizer["state"][weight_group["params"][0]]["momentum_buffer"]
    # First step, no warm-up: update = lr * trust_ratio * g with trust_ratio = 0.001 |w| / |g|, so its norm is
    # 0.001 * lr * |w| whatever the gradient; plain SGD would move it by lr * |g|.
    update = LR * momentum
    before = after + update
    assert update.norm().item() == pytest.approx(1e-3 * LR * before.norm().item(), rel=1e-4)
    assert weight_group["weight_decay"] == 0.0


def test_reported_accuracy_is_the_saved_predictions(probe_run, cached_run):
    for output_dir, results in (probe_run[:2], cached_run):
        predictions = read_predictions(output_dir)
        assert len(predictions) == NUM_EVAL == results["eval_samples"]
        top1 = sum(p["top5"][0] == p["label"] for p in predictions) / len(predictions)
        top5 = sum(p["label"] in p["top5"] for p in predictions) / len(predictions)
        assert read_results(output_dir)["eval_top1"] == results["eval_top1"] == pytest.approx(top1)
        assert results["eval_top5"] == pytest.approx(top5)


def test_output_folder_works_in_pipeline(probe_run, cifar_small):
    output_dir, _, _ = probe_run
    images, _ = eval_images(cifar_small, 16)
    classifier = pipeline("image-classification", model=str(output_dir), device="cpu")
    predicted = [result[0]["label"] for result in classifier(images)]
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    assert model.config.id2label == dict(enumerate(CIFAR_CLASSES))
    assert predicted == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_push_uploads_our_card_and_the_model_without_checkpoints(probe_run, cifar_small):
    _, results, hub_calls = probe_run
    assert [name for name, _ in hub_calls] == ["init", "create_repo", "upload_folder"]
    upload = hub_calls[-1][1]
    assert upload["repo_id"] == hub_calls[1][1]["repo_id"] == "someone/ldae-tiny-probe"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "all_results.json",
            "eval_predictions.jsonl"} <= set(upload["files"])
    assert not [name for name in upload["files"] if "checkpoint-" in name]
    # The uploaded README.md is the probe's card, not one the Trainer generated over it.
    card = (Path(upload["folder_path"]) / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "- linear-probe" in card
    assert "Linear probe (MAE protocol, augmented)" in card
    assert f"| eval_top1 | {results['eval_top1']:.4f} |" in card
    check_classifier_card(Path(upload["folder_path"]) / "README.md", results, "Linear probe (MAE protocol)",
                          cifar_small)


def test_cached_features_same_head_and_saved_model(cached_run, probe_run, tiny_checkpoint, cifar_small):
    output_dir, results = cached_run
    assert results["probe_mode"] == read_results(output_dir)["probe_mode"] == "cached_features"
    cached, augmented = load_file(output_dir / "model.safetensors"), load_file(probe_run[0] / "model.safetensors")
    assert {k: v.shape for k, v in cached.items()} == {k: v.shape for k, v in augmented.items()}
    pretrained = load_file(tiny_checkpoint / "model.safetensors")
    assert all(torch.equal(v, pretrained[k]) for k, v in cached.items() if k.startswith("ldae."))
    # The cached evaluation features are what the saved model computes from the images.
    images, _ = eval_images(cifar_small, NUM_EVAL)
    classifier = pipeline("image-classification", model=str(output_dir), device="cpu", top_k=1)
    names = LDAEConfig.from_pretrained(output_dir).label2id
    predicted = [names[result[0]["label"]] for result in classifier(images, batch_size=BATCH)]
    assert predicted == [p["top5"][0] for p in read_predictions(output_dir)]


def test_resume_continues_the_run(cached_run, tiny_checkpoint, cifar_small, tmp_path):
    # Cached features make the run deterministic: resuming from step 4 must reproduce it exactly.
    original, _ = cached_run
    resumed = tmp_path / "out"
    resumed.mkdir()
    shutil.copytree(original / "checkpoint-4", resumed / "checkpoint-4")
    results = main(probe_argv(tiny_checkpoint, cifar_small, resumed, "--cache_features"))
    losses = {e["step"]: e["loss"] for e in json.loads((original / "trainer_state.json").read_text())["log_history"]
              if "loss" in e}
    assert results["train_loss"] == pytest.approx(sum(losses[s] for s in range(5, STEPS + 1)) / (STEPS - 4))
    final, expected = load_file(resumed / "model.safetensors"), load_file(original / "model.safetensors")
    for key in ("classifier.weight", "classifier.bias", "fc_norm.running_var"):
        torch.testing.assert_close(final[key], expected[key])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_corrupt_images(source: Path, destination: Path, count: int, corrupt: list[int]) -> None:
    table = pq.read_table(source).slice(0, count)
    rows = table.to_pylist()
    for index in corrupt:
        rows[index]["img"] = {"bytes": b"not an image", "path": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), destination)


def test_two_processes_stream_each_decoding_its_share(tiny_checkpoint, cifar_small, tmp_path):
    """torchrun, 2 CPU processes, one-shard streams with corrupt images: every image is decoded exactly once, by the
    process that uses it (per-process decode-failure counts), and evaluation counts each example once, without the
    repeats that pad the last batch or the corrupt images."""
    data, num_eval = tmp_path / "corrupt", 50  # not a multiple of the batch: the last one is padded
    data.mkdir()
    corrupt_train, corrupt_eval = list(range(5, NUM_TRAIN, 32)), [3, 40]
    _with_corrupt_images(cifar_small / "train-00000-of-00001.parquet", data / "train-00000-of-00001.parquet",
                         NUM_TRAIN, corrupt_train)
    _with_corrupt_images(cifar_small / "test-00000-of-00001.parquet", data / "test-00000-of-00001.parquet",
                         num_eval, corrupt_eval)
    output_dir = tmp_path / "out"
    per_device = BATCH // 2
    argv = probe_argv(tiny_checkpoint, data, output_dir, "--streaming", "--max_train_samples", str(NUM_TRAIN),
                      "--per_device_train_batch_size", str(per_device), "--per_device_eval_batch_size", "16",
                      "--num_train_epochs", "1", "--save_strategy", "no", "--use_cpu", "true")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(REPO_ROOT / "run_linear_probe.py"), *argv]
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = read_results(output_dir)
    failures = results["decode_failures_per_process"]
    # Evaluation pads its last global batch (18 of 32) with the first 14 examples, so image 3 fails twice.
    assert len(failures) == 2 and all(failures) and sum(failures) == len(corrupt_train) + len(corrupt_eval) + 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == steps_from_epochs(NUM_TRAIN, BATCH, 1)
    predictions = read_predictions(output_dir)
    labels = [row["label"] for row in pq.read_table(data / "test-00000-of-00001.parquet").to_pylist()]
    assert [p["label"] for p in predictions] == [y for i, y in enumerate(labels) if i not in corrupt_eval]
    assert results["eval_samples"] == num_eval - len(corrupt_eval)
    top1 = sum(p["top5"][0] == p["label"] for p in predictions) / len(predictions)
    assert results["eval_top1"] == pytest.approx(top1)


# ---------------------------------------------------------------------------------------------------- bad input


def _write_rows(folder: Path, rows: dict, features: datasets.Features) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def cifar_rows(cifar_small) -> dict:
    return pq.read_table(cifar_small / "test-00000-of-00001.parquet").slice(0, 8).to_pydict()


def _bad_data(kind: str, cifar_rows: dict, folder: Path) -> Path:
    images, labels = cifar_rows["img"], cifar_rows["label"]
    image = datasets.Image()
    if kind == "no_labels":
        return _write_rows(folder, {"img": images}, datasets.Features({"img": image}))
    if kind == "string_labels":
        return _write_rows(folder, {"img": images, "label": [CIFAR_CLASSES[i] for i in labels]},
                           datasets.Features({"img": image, "label": datasets.Value("string")}))
    features = datasets.Features({"img": image, "label": datasets.ClassLabel(names=CIFAR_CLASSES)})
    if kind == "unlabelled":
        return _write_rows(folder, {"img": images, "label": [-1] * len(labels)}, features)
    return _write_rows(folder, {"img": [], "label": []}, features)  # empty


def _bad_checkpoint(kind: str, tiny_checkpoint: Path, folder: Path) -> Path:
    if kind == "vit":
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
            folder)
    elif kind == "unfitted_pca":
        LDAEForPreTraining(LDAEConfig.from_preset("ldae-tiny")).save_pretrained(folder)
    elif kind == "three_classes":
        LDAEForImageClassification(LDAEConfig.from_preset("ldae-tiny", num_labels=3)).save_pretrained(folder)
    elif kind != "missing":
        return tiny_checkpoint
    return folder


@pytest.mark.parametrize(
    ("data_kind", "checkpoint_kind", "extra", "message"),
    [
        ("no_labels", None, [], r"No label column found among \['label', 'labels', 'cls'\]; the data set has "
                                r"columns \['img'\]"),
        ("cifar", None, ["--label_column_name", "fine_label"], r"label column 'fine_label' not found"),
        ("string_labels", None, [], r"Label column 'label' has type .*string.*, not integer class ids.*"
                                    r"\(--label_column_name\)"),
        ("unlabelled", None, [], r"holds -1, not a class id in \[0, 10\)"),
        ("empty", None, [], r"The split '(train|test)' of .* is empty"),
        ("cifar", None, ["--streaming"], r"does not tell its size .* pass --max_steps"),
        ("cifar", None, ["--max_train_samples", "0"], r"--max_train_samples 0 leaves no examples"),
        ("cifar", None, ["--push_to_hub", "--hub_model_id", "me/a b"],
         r"--hub_model_id 'me/a b' is not a valid Hub repository id"),
        ("cifar", "vit", [], r"is a 'vit' checkpoint \(ViTConfig\), not an l-DAE one"),
        ("cifar", "unfitted_pca", ["--feature_input", "pca"], r"feature_input='pca' needs the checkpoint's PCA"),
        ("cifar", "three_classes", [], r"has num_labels = 3, but the data has 10 classes"),
        ("cifar", "missing", [], r"--model_name_or_path '.*checkpoint' is not a checkpoint folder"),
        ("cifar", None, ["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "epoch"],
         r"--load_best_model_at_end requires the save and eval strategy to match"),
        ("cifar", None, ["--do_train", "false", "--do_eval", "false"], r"Nothing to do"),
        # Gone: it was accepted and ignored (the installed l-DAE classes always load).
        ("cifar", None, ["--trust_remote_code", "true"], r"not used by the HfArgumentParser: \['--trust_remote_code'"),
    ],
)
def test_bad_input_is_one_line_before_training(
    data_kind, checkpoint_kind, extra, message, tiny_checkpoint, cifar_small, cifar_rows, tmp_path, capsys
):
    data = cifar_small if data_kind == "cifar" else _bad_data(data_kind, cifar_rows, tmp_path / "data")
    checkpoint = _bad_checkpoint(checkpoint_kind, tiny_checkpoint, tmp_path / "checkpoint")
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(probe_argv(checkpoint, data, output_dir, *extra))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_linear_probe.py: error:")]
    assert len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_argument_file_gives_required_flags_and_later_flags_override_it(tiny_checkpoint, cifar_small, tmp_path):
    # Evaluation only: the file alone must get past argparse's check of --model_name_or_path.
    arguments = tmp_path / "probe.yaml"
    arguments.write_text(
        f"model_name_or_path: {tiny_checkpoint}\ndataset_name: {cifar_small}\noutput_dir: {tmp_path / 'out'}\n"
        f"cache_dir: {tmp_path / 'cache'}\ndo_eval: true\nmax_eval_samples: 8\nper_device_eval_batch_size: 16\n"
        "dataloader_pin_memory: false\ndisable_tqdm: true\n"
    )
    results = main([str(arguments), "--max_eval_samples", "16"])
    assert results["eval_samples"] == len(read_predictions(tmp_path / "out")) == 16
    assert "train_samples" not in results


def test_processes_that_did_not_join_are_refused(tiny_checkpoint, cifar_small, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; this process still forms no group
    with pytest.raises(SystemExit):
        main(probe_argv(tiny_checkpoint, cifar_small, tmp_path / "out"))
    assert "2 processes were launched, but the Trainer sees 1: on CPU pass --use_cpu true" in capsys.readouterr().err


def test_linear_probe_on_features_of_any_encoder(cifar10_train_images, tmp_path):
    """The cached-feature probe on features that are not an l-DAE model's: it learns what they carry, and memorised
    noise does not transfer."""
    from modeling_ldae.classification import linear_probe_on_features

    _, labels = cifar10_train_images
    noise = torch.randn(len(labels), 32, generator=torch.Generator().manual_seed(0))
    informative = torch.cat([noise, torch.nn.functional.one_hot(labels, 10).float()], dim=1)
    # LARS moves a weight by lr x 0.001 x |w| per step: a short run needs a large lr to converge.
    arguments = dict(num_labels=10, num_train_epochs=30, per_device_train_batch_size=32, base_learning_rate=200.0,
                     warmup_epochs=1, seed=0)
    useful = linear_probe_on_features(informative[:384], labels[:384], informative[384:], labels[384:],
                                      output_dir=tmp_path / "useful", **arguments)
    assert useful["top1"] > 0.95 and useful["train_top1"] > 0.95 and useful["top5"] >= useful["top1"]
    chance = linear_probe_on_features(noise[:384], labels[:384], noise[384:], labels[384:],
                                      output_dir=tmp_path / "chance", **arguments)
    assert chance["top1"] < 0.25 < chance["train_top1"]
