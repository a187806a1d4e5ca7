"""`run_pretrain.py` end to end on real CIFAR-10 images: in-process `main(argv)` runs of the tiny preset, one
2-process `accelerate launch` run (which is also the real CLI run), a recording fake of `HfApi` for the upload."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForPreTraining

import run_pretrain
from conftest import recording_hub, write_cifar_subset
from modeling_ldae import JOURNEY_STAGES, LDAEConfig, LDAEForPreTraining, LDAEModel
from modeling_ldae.cli import InputError
from modeling_ldae import hub
from modeling_ldae.monitors import TrainingHook, read_metrics
from modeling_ldae.checkpointing import check_resumable, comparable_config
from modeling_ldae.data import DataSource, DecodingCollator, eval_transform
from modeling_ldae.knn import knn_top1
from modeling_ldae.pretraining import LossWindow, build_model, first_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST = 256, 64
TINY = [
    "--model_preset", "ldae-tiny", "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0",
    "--base_learning_rate", "2e-3", "--warmup_steps", "2", "--pca_num_images", "128", "--pca_num_patches", "4096",
    "--logging_steps", "4", "--num_monitor_images", "8", "--monitor_steps", "0", "--seed", "0",
]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, cifar10_dir) -> Path:
    """256 CIFAR-10 training images in two parquet shards plus 64 test images, with an `id` column."""
    root = tmp_path_factory.mktemp("cifar_parquet")
    features = datasets.Features(img=datasets.Image(), label=datasets.ClassLabel(num_classes=10),
                                 id=datasets.Value("int64"))
    for split, count, shards in (("train", NUM_TRAIN, 2), ("test", NUM_TEST, 1)):
        rows = pq.read_table(cifar10_dir / f"{split}-00000-of-00001.parquet").slice(0, count).to_pylist()
        table = datasets.Dataset.from_dict(
            {"img": [r["img"] for r in rows], "label": [r["label"] for r in rows], "id": list(range(count))},
            features=features,
        )
        for index in range(shards):
            table.shard(shards, index, contiguous=True).to_parquet(
                root / f"{split}-{index:05d}-of-{shards:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, cifar10_dir) -> Path:
    """40 CIFAR-10 JPEG files in class folders, plus one truncated JPEG."""
    root = tmp_path_factory.mktemp("cifar_jpeg")
    rows = pq.read_table(cifar10_dir / "train-00000-of-00001.parquet").slice(0, 40).to_pylist()
    for index, row in enumerate(rows):
        folder = root / "train" / f"class{row['label']}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.jpg").write_bytes(row["img"]["bytes"])
    (root / "train" / "class0" / "broken.jpg").write_bytes(rows[0]["img"]["bytes"][:120])
    return root


def run(argv, hooks=()):
    return run_pretrain.main([str(a) for a in argv], hooks=hooks)


class AtStep(TrainingHook):
    """Runs `action(state)` once, after optimizer step `step` (fault injection)."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step(self, state):
        if state.step == self.step:
            self.action(state)
        return {}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, parquet_dir):
    """One full map-style run: PCA fit, 24 steps, monitor, k-NN, checkpoints, final model, Hub upload (faked)."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    try:
        with recording_hub() as calls:
            progress = run([*TINY, "--train_dir", parquet_dir, "--output_dir", output_dir, "--max_steps", 24,
                        "--monitor_steps", 12, "--save_steps", 8, "--save_total_limit", 2, "--knn_eval_steps", 24,
                        "--eval_split_name", "test", "--knn_train_samples", 128, "--max_eval_samples", 64,
                           "--push_to_hub", "--hub_model_id", "someone/ldae-tiny-cifar", "--hub_token", "tok"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return output_dir, progress, calls


@pytest.mark.floor
def test_end_to_end_output_loads_with_fitted_pca_and_health_signals(trained_run, parquet_dir):
    output_dir, progress, _ = trained_run
    assert progress.step == 24
    encoder = AutoModel.from_pretrained(output_dir)
    pretraining = AutoModelForPreTraining.from_pretrained(output_dir)
    assert isinstance(encoder, LDAEModel) and isinstance(pretraining, LDAEForPreTraining)
    pca = pretraining.ldae.pca
    assert pca.is_fitted and pca.components.dtype == torch.float32
    gram = pca.components.double() @ pca.components.double().T
    assert torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-5)
    assert (pca.eigenvalues[:-1] >= pca.eigenvalues[1:]).all()
    assert torch.equal(encoder.pca.components, pca.components)

    metrics = read_metrics(output_dir)
    assert 0.5 < next(m for m in metrics if "pca/explained_variance_top_d" in m)["pca/explained_variance_top_d"] < 1
    train_logs = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train_logs] == [4, 8, 12, 16, 20, 24]
    assert train_logs[-1]["train/loss"] < train_logs[0]["train/loss"]  # it learns
    assert all(m["train/grad_norm"] > 0 and m["train/images_per_second"] > 0 for m in train_logs)
    assert all(len([k for k in m if k.startswith("loss_by_sigma/")]) >= 3 for m in train_logs)
    monitor = [m for m in metrics if "monitor/loss" in m]
    assert [m["step"] for m in monitor] == [12, 24]
    for t in (10, 250, 500, 750, 999):
        assert monitor[-1][f"monitor/copy_loss_t{t}"] > 0 and monitor[-1][f"monitor/loss_t{t}"] > 0
    # Copying the input is a strong baseline at low noise, a weak one at high noise.
    assert monitor[-1]["monitor/copy_loss_t10"] < monitor[-1]["monitor/copy_loss_t999"]
    # The k-NN monitor scores the final encoder exactly as a direct computation does.
    source = DataSource(train_dir=str(parquet_dir))
    collate = DecodingCollator(eval_transform(32), "img", "label")
    bank, queries = (collate(rows) for rows in (first_rows(source, "train", "img", 128, "label", shuffle_seed=0),
                                                first_rows(source, "test", "img", 64, "label")))
    with torch.no_grad():
        bank_features, query_features = (encoder(batch["pixel_values"]).pooler_output for batch in (bank, queries))
    expected = knn_top1(bank_features, bank["labels"], query_features, queries["labels"], num_classes=10)
    assert next(m for m in metrics if "knn/top1" in m)["knn/top1"] == pytest.approx(expected, abs=1e-6)

    assert (output_dir / "pca_components.png").stat().st_size > 0
    assert sorted(p.name for p in (output_dir / "denoising").iterdir()) == ["step-0000012.png", "step-0000024.png"]
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]
    assert not list(output_dir.glob(".tmp*"))
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.license == "apache-2.0" and "arxiv:2401.14404" in card.data.tags
    assert "| training steps | 24 |" in card.text and "final training loss" in card.text
    assert 'AutoModel.from_pretrained("someone/ldae-tiny-cifar", trust_remote_code=True)' in card.text
    # The k-NN monitor's last result, on the local data's held-out split, with what it ran on.
    (knn,) = card.data.eval_results
    assert (knn.dataset_type, knn.dataset_name, knn.dataset_split) == ("imagefolder", parquet_dir.name, "test")
    assert (knn.task_type, knn.metric_type) == ("image-classification", "accuracy")
    assert knn.metric_value == pytest.approx(expected / 100, abs=1e-6)
    assert knn.metric_args == {"k": 20, "temperature": 0.07, "bank_size": 128, "bank_split": "train",
                               "query_size": 64}


def test_push_to_hub_uploads_the_model_without_checkpoints(trained_run):
    output_dir, _, calls = trained_run
    (_, init), (_, create), (_, upload) = calls
    assert init == {"token": "tok"} and create["repo_id"] == "someone/ldae-tiny-cifar"
    files = upload["files"]
    for name in ("README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_ldae.py",
                 "configuration_ldae.py", "pca_components.png"):
        assert name in files
    assert not [f for f in files if "checkpoint" in f or ".tmp" in f]


def test_streaming_image_folder_skips_corrupt_jpeg(tmp_path, image_folder, capsys):
    argv = [*TINY, "--train_dir", image_folder, "--streaming", "true", "--per_device_train_batch_size", 8,
            "--pca_num_images", 16, "--output_dir", tmp_path / "out"]
    with pytest.raises(SystemExit) as failure:  # a stream whose size is unknown cannot turn epochs into steps
        run(argv)
    assert failure.value.code == 2
    assert "--max_steps" in capsys.readouterr().err
    progress = run([*argv, "--max_steps", 8, "--monitor_steps", 8])
    assert progress.step == 8
    metrics = read_metrics(tmp_path / "out")
    assert max(m.get("data/decode_failures", 0) for m in metrics) >= 1
    assert (tmp_path / "out" / "denoising" / "step-0000008.png").exists()  # monitor images from the training split
    assert AutoModelForPreTraining.from_pretrained(tmp_path / "out").ldae.pca.is_fitted


def _state(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_sigterm_checkpoint_resumes_to_the_uninterrupted_weights(streaming, tmp_path, parquet_dir, tiny_checkpoint):
    # 64 images / batch 16 = 4 batches per epoch: 12 steps cross epochs, the signal lands mid-epoch. The stream
    # resumes exactly too here: same files, seed and workers replay the same order.
    argv = [*TINY, "--train_dir", parquet_dir, "--max_train_samples", 64, "--max_steps", 12,
            "--save_steps", 4, "--tokenizer_from", tiny_checkpoint, "--streaming", streaming]
    run([*argv, "--output_dir", tmp_path / "straight"])

    interrupted = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as stopped:
        run([*argv, "--output_dir", interrupted], hooks=[AtStep(6, lambda state: os.kill(os.getpid(), signal.SIGTERM))])
    assert stopped.value.code == 128 + signal.SIGTERM
    # Processes agree to stop at the next step's all-reduce: the checkpoint is step 7 (epoch 1, 3 batches in).
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-7"]
    assert json.loads((interrupted / "checkpoint-7" / "trainer_state.json").read_text())["positions"] == [[1, 3]]
    assert AutoModelForPreTraining.from_pretrained(interrupted / "checkpoint-7").ldae.pca.is_fitted
    assert not (interrupted / "config.json").exists()

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    progress = run([*argv, "--output_dir", interrupted, "--resume_from_checkpoint", "latest"])
    assert progress.step == 12
    straight, resumed = _state(tmp_path / "straight"), _state(interrupted)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    # The PCA came from --tokenizer_from, untouched by training.
    assert torch.equal(straight["ldae.pca.components"], _state(tiny_checkpoint)["ldae.pca.components"])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, parquet_dir, tiny_checkpoint, capsys):
    def poison_weights(state):
        with torch.no_grad():
            state.accelerator.unwrap_model(state.model).final_layer.linear.weight.fill_(float("nan"))

    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        run([*TINY, "--train_dir", parquet_dir, "--max_train_samples", 64, "--max_steps", 10,
             "--save_steps", 4, "--tokenizer_from", tiny_checkpoint, "--output_dir", output_dir],
            hooks=[AtStep(4, poison_weights)])
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert "Non-finite loss at step 5" in error and "checkpoint-4" in error
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    assert all(torch.isfinite(t).all() for t in _state(output_dir / "checkpoint-4").values())
    assert not (output_dir / "config.json").exists()


def test_vit_mae_baseline_trains_through_the_same_loop(tmp_path, parquet_dir):
    overrides = ("image_size=32,patch_size=8,hidden_size=64,num_hidden_layers=2,num_attention_heads=4,"
                 "intermediate_size=128,decoder_hidden_size=64,decoder_num_hidden_layers=1,"
                 "decoder_num_attention_heads=4,decoder_intermediate_size=128")
    args = run_pretrain.parse_args(["--model_type", "vit_mae", "--config_overrides", overrides])
    model = build_model(args[0])
    assert model.vit.embeddings.position_embeddings.abs().sum() > 0
    assert model.decoder.decoder_pos_embed.abs().sum() > 0

    argv = [*TINY[2:], "--model_type", "vit_mae", "--config_overrides", overrides, "--train_dir", parquet_dir,
            "--max_train_samples", 64, "--max_steps", 8, "--output_dir", tmp_path / "mae"]
    assert run(argv).step == 8
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path / "mae")
    assert type(loaded).__name__ == "ViTMAEForPreTraining"
    assert loaded.vit.embeddings.position_embeddings.abs().sum() > 0
    assert all(m["train/loss"] > 0 for m in read_metrics(tmp_path / "mae") if "train/loss" in m)
    assert not (tmp_path / "mae" / "pca_components.png").exists()


@pytest.mark.parametrize("case", ["preset", "image_column", "no_images", "resume_missing", "resume_other_config",
                                  "output_dir_taken", "tokenizer_from_missing", "save_total_limit", "hub_model_id",
                                  "unknown_config_key"])
def test_bad_input_fails_before_any_work(case, tmp_path, parquet_dir, trained_run, capsys):
    out = tmp_path / "out"
    base = [*TINY, "--train_dir", parquet_dir, "--max_steps", 4, "--output_dir", out]
    argv, expected = {
        "preset": ([*base, "--model_preset", "ldae-huge"], "Unknown l-DAE preset 'ldae-huge'"),
        "image_column": ([*base, "--image_column_name", "photo"], "'photo' not found; the data set has columns"),
        "no_images": ([*base[:-4], "--train_dir", tmp_path, "--max_steps", 4, "--output_dir", out],
                      "contains no image files"),
        "resume_missing": ([*base, "--resume_from_checkpoint", tmp_path / "nowhere"], "no complete checkpoint there"),
        "resume_other_config": ([*base, "--resume_from_checkpoint", trained_run[0] / "checkpoint-24",
                                 "--config_overrides", "pca_dim=16"], "belongs to another model config"),
        "output_dir_taken": ([*TINY, "--train_dir", parquet_dir, "--output_dir", trained_run[0]],
                             "already holds checkpoints or a model"),
        "tokenizer_from_missing": ([*base, "--tokenizer_from", tmp_path / "no_model"],
                                   f"--tokenizer_from {tmp_path / 'no_model'}: neither a tokenizer folder"),
        "save_total_limit": ([*base, "--save_total_limit", 0], "--save_total_limit 0 would delete the checkpoint"),
        "hub_model_id": ([*base, "--push_to_hub", "--hub_model_id", "me/two words"], "not a valid Hub repository id"),
        "unknown_config_key": ([*base, "--config_overrides", "pca_dim=8,loss_weigthing=snr"],
                               "LDAEConfig has no key 'loss_weigthing' (did you mean 'loss_weighting'?)"),
    }[case]
    with pytest.raises(SystemExit) as failure:
        run(argv)
    assert failure.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_pretrain.py: error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists() or not any(out.glob("checkpoint-*"))


def test_two_processes_each_example_once_per_epoch(tmp_path, parquet_dir):
    """The real CLI, streaming, in 2 processes. `accelerate launch --cpu --num_processes 2` would start one process
    (accelerate 1.15 runs CPU multi-process only through mpirun); torchrun via --multi_gpu + ACCELERATE_USE_CPU
    gives two gloo processes."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model_preset: ldae-tiny\nper_device_train_batch_size: 8\ngradient_accumulation_steps: 2\n"
        "num_train_epochs: 2\nnum_train_examples: 256\nwarmup_steps: 2\nbase_learning_rate: 0.002\n"
        "dataloader_num_workers: 0\n"
        "pca_num_images: 64\npca_num_patches: 2048\nlogging_steps: 4\nmonitor_steps: 0\n"
        "save_steps: 4\nsave_total_limit: 2\nlog_example_ids: true\nexample_id_column_name: id\n"
    )
    output_dir = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "run_pretrain.py"), str(config),
         "--train_dir", str(parquet_dir), "--streaming", "true", "--output_dir", str(output_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Global batch 32 (8 per device x 2 processes x 2 accumulation)" in result.stderr
    # 64 images x all 16 patches: both processes' sums went into the fit (each process read 32 images, 512 patches).
    assert "PCA tokenizer fitted on 1024 patches of 64 images" in result.stderr

    per_rank = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in
                   (output_dir / "logs" / "example_ids" / f"rank{rank}.jsonl").read_text().splitlines()]
        per_rank[rank] = {epoch: [i for r in records if r["epoch"] == epoch for i in r["ids"]] for epoch in (0, 1)}
    for epoch in (0, 1):
        rank0, rank1 = per_rank[0][epoch], per_rank[1][epoch]
        assert len(rank0) == len(rank1) == NUM_TRAIN // 2  # each process decodes its own half
        assert sorted(rank0 + rank1) == list(range(NUM_TRAIN))  # every example exactly once
    assert per_rank[0][0] != per_rank[0][1]  # reshuffled between epochs
    model = AutoModelForPreTraining.from_pretrained(output_dir)
    assert model.ldae.pca.is_fitted
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]
    # Both processes were one owner of the folder: one launch wrote every checkpoint, and released the folder.
    launches = {json.loads((p / "trainer_state.json").read_text())["launch_id"]
                for p in output_dir.glob("checkpoint-*")}
    assert len(launches) == 1 and None not in launches
    assert not (output_dir / ".ldae-owner.json").exists()


RECIPES = sorted((REPO_ROOT / "configs" / "pretrain").glob("ldae-vit-*.yaml"))  # the paper's ImageNet recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_parse_to_the_paper_settings(recipe):
    model_args, data_args, args = run_pretrain.parse_args([str(recipe), "--output_dir", "out"])
    preset, epochs = recipe.stem.rsplit("-", 1)
    assert model_args.model_preset == preset and args.num_train_epochs == int(epochs.removesuffix("ep"))
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 2048  # the 1 x 8 launch
    assert args.base_learning_rate == 1e-4 and args.warmup_epochs == 100 and args.weight_decay == 0
    assert args.bf16 and args.save_total_limit >= 1


def test_mae_baseline_recipe_builds_vit_mae_at_256px():
    model_args, _, args = run_pretrain.parse_args([str(REPO_ROOT / "configs/pretrain/mae-vit-base-400ep.yaml")])
    config = build_model(model_args).config
    assert config.model_type == "vit_mae" and config.image_size == 256 and config.hidden_size == 768
    assert args.per_device_train_batch_size * 8 == 2048 and args.num_train_epochs == 400


def test_cifar10_recipe_is_the_studies_regime_and_trains(tmp_path, cifar10_dir):
    recipe = REPO_ROOT / "configs" / "pretrain" / "ldae-cifar10-recipe.yaml"
    model_args, _, args = run_pretrain.parse_args([str(recipe), "--output_dir", str(tmp_path)])
    assert (args.per_device_train_batch_size, args.base_learning_rate, args.max_steps, args.warmup_steps,
            args.lr_scheduler_type) == (32, 8e-3, 3099, 154, "cosine")
    output_dir = tmp_path / "out"
    run([recipe, "--dataset_name", write_cifar_subset(cifar10_dir, tmp_path / "data", 64, 16), "--output_dir",
         output_dir, "--max_steps", 2, "--warmup_steps", 1, "--pca_num_images", 64, "--monitor_steps", 0,
         "--dataloader_num_workers", 0, "--save_steps", 0, "--logging_steps", 1])
    config = LDAEConfig.from_pretrained(output_dir)
    expected = {**JOURNEY_STAGES[model_args.journey_stage], "image_size": 32, "patch_size": 8, "pca_dim": 8,
                "hidden_size": 192, "num_hidden_layers": 4, "decoder_num_hidden_layers": 4, "num_attention_heads": 3,
                "intermediate_size": 768, "adaln_init": "zero"}
    assert {key: getattr(config, key) for key in expected} == expected
    assert [m["step"] for m in read_metrics(output_dir) if "train/loss" in m] == [1, 2]
    assert AutoModelForPreTraining.from_pretrained(output_dir).ldae.pca.is_fitted


# ---------------------------------------------------------------------------------------------------- faults


def test_resume_latest_on_a_finished_run_exits_without_touching_the_model(tmp_path, parquet_dir, tiny_checkpoint,
                                                                           caplog):
    # A run that finished without keeping checkpoints, started again as a pre-emptible job script would.
    argv = [*TINY, "--train_dir", parquet_dir, "--max_train_samples", 32, "--max_steps", 2, "--save_steps", 0,
            "--tokenizer_from", tiny_checkpoint, "--output_dir", tmp_path / "out", "--resume_from_checkpoint", "latest"]
    assert run(argv).step == 2
    weights = (tmp_path / "out" / "model.safetensors").read_bytes()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert run(argv) is None
    assert "is finished" in caplog.text and "--model_name_or_path" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_rotation_ignores_other_folders_and_keeps_the_newest(tmp_path, parquet_dir, tiny_checkpoint):
    out = tmp_path / "out"
    (out / "checkpoint-best").mkdir(parents=True)  # a stray folder: not this run's checkpoint
    (out / "checkpoint-best" / "note.txt").write_text("keep me")
    # No checkpoints and no model in the folder yet: `latest` starts the run.
    progress = run([*TINY, "--train_dir", parquet_dir, "--max_train_samples", 32, "--max_steps", 6, "--save_steps", 2,
                    "--save_total_limit", 1, "--tokenizer_from", tiny_checkpoint, "--output_dir", out,
                    "--resume_from_checkpoint", "latest"])
    assert progress.step == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-best"]
    assert (out / "checkpoint-best" / "note.txt").read_text() == "keep me"


def test_loss_window_does_not_count_zero_weight_stand_ins():
    accelerator = Accelerator(cpu=True)
    window = LossWindow(accelerator.device)
    window.add(torch.tensor(2.0), 1.0, 16)
    window.add(torch.tensor(0.0), 0.0, 1)  # a batch whose images all failed to decode
    window.add(torch.tensor(4.0), 1.0, 16)
    metrics = window.metrics(accelerator)
    assert metrics["train/loss"] == pytest.approx(3.0)
    assert window.nonfinite.item() == 0
    window.add(torch.tensor(float("nan")), 1.0, 16)
    assert window.nonfinite.item() == 1


def test_crash_while_checkpointing_keeps_the_previous_one_and_resumes_from_it(tmp_path, parquet_dir, tiny_checkpoint,
                                                                               monkeypatch, capsys, caplog):
    save_state = Accelerator.save_state

    def save_then_fail_at_step_8(self, output_dir=None, **kwargs):
        save_state(self, output_dir, **kwargs)  # the weights are on disk, the checkpoint is not complete
        if output_dir.endswith("checkpoint-8"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", save_then_fail_at_step_8)
    out = tmp_path / "out"
    argv = [*TINY, "--train_dir", parquet_dir, "--max_train_samples", 64, "--max_steps", 12, "--save_steps", 4,
            "--save_total_limit", 2, "--tokenizer_from", tiny_checkpoint, "--output_dir", out,
            "--resume_from_checkpoint", "latest"]
    with pytest.raises(SystemExit) as failed:
        run(argv)
    assert failed.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "run_pretrain.py: error: OSError: [Errno 28] No space left on device"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]
    assert AutoModelForPreTraining.from_pretrained(out / "checkpoint-4").ldae.pca.is_fitted

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert run(argv).step == 12
    assert f"Resumed from {out / 'checkpoint-4'} at step 4" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]


def test_full_disk_while_saving_the_model_leaves_no_half_written_model(tmp_path, parquet_dir, tiny_checkpoint,
                                                                      monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "write_model_card", disk_full)  # after the weights and processor are written
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as failed:
        run([*TINY, "--train_dir", parquet_dir, "--max_train_samples", 32, "--max_steps", 4, "--save_steps", 4,
             "--tokenizer_from", tiny_checkpoint, "--output_dir", out])
    assert failed.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "run_pretrain.py: error: OSError: [Errno 28] No space left on device"
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix != ".png") == []
    assert not list(out.glob(".tmp*"))
    assert AutoModelForPreTraining.from_pretrained(out / "checkpoint-4").ldae.pca.is_fitted


FAILING_RUN = """
import json, multiprocessing, sys
sys.path.insert(0, {repo!r})
import run_pretrain
from modeling_ldae.monitors import TrainingHook

class Fail(TrainingHook):
    def on_step(self, state):
        if state.step == 3 and state.accelerator.process_index == 0:
            with open({pids!r}, "w") as file:
                json.dump([child.pid for child in multiprocessing.active_children()], file)
            raise RuntimeError("injected failure")
        return {{}}

run_pretrain.main(sys.argv[1:], hooks=[Fail()])
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" not in status.read_text()


def _processes_running(script: Path) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(script) in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # it ended while we looked
            continue
    return pids


@pytest.mark.parametrize("processes", [1, 2])
def test_an_error_in_the_loop_ends_every_process_and_worker(processes, tmp_path, parquet_dir, tiny_checkpoint):
    script, pids = tmp_path / "failing_run.py", tmp_path / "workers.json"
    script.write_text(FAILING_RUN.format(repo=str(REPO_ROOT), pids=str(pids)))
    argv = [*TINY, "--dataloader_num_workers", 2, "--train_dir", parquet_dir, "--max_steps", 10,
            "--tokenizer_from", tiny_checkpoint, "--output_dir", tmp_path / "out"]
    launch = [sys.executable, str(script)] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "ACCELERATE_USE_CPU": "1"}
    # Before the fix this hung forever: the workers ignore SIGTERM, and the interpreter waited for them at exit.
    result = subprocess.run([*launch, *map(str, argv)], env=env, capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("run_pretrain.py: error:")]
    assert "run_pretrain.py: error: RuntimeError: injected failure" in errors
    workers = json.loads(pids.read_text())
    assert len(workers) == 2 and not [pid for pid in workers if _alive(pid)]
    # Nothing of the run is left: no rank, no worker of any rank.
    assert not [pid for pid in _processes_running(script) if _alive(pid)]


def test_resume_compares_configs_with_missing_keys_as_defaults():
    config = LDAEConfig.from_preset("ldae-tiny")
    layout = {"num_processes": 1, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1}
    saved_config = comparable_config(config)
    # Written by an older version, before `single_noise_level` existed (its default is None): still resumable.
    del saved_config["single_noise_level"]
    check_resumable(Path("checkpoint-8"), {"model_config": saved_config, **layout}, config, layout)
    # Keys that only choose which outputs a backbone returns do not block a resume.
    check_resumable(Path("checkpoint-8"), {"model_config": comparable_config(config), **layout},
                    LDAEConfig.from_preset("ldae-tiny", output_hidden_states=True), layout)
    with pytest.raises(InputError, match="differs in pca_dim"):
        check_resumable(Path("checkpoint-8"), {"model_config": saved_config, **layout},
                        LDAEConfig.from_preset("ldae-tiny", pca_dim=16), layout)
    with pytest.raises(InputError, match="num_processes 1 -> 2"):
        check_resumable(Path("checkpoint-8"), {"model_config": comparable_config(config), **layout}, config,
                        {**layout, "num_processes": 2})


class RecordBatchLosses(TrainingHook):
    def __init__(self):
        self.losses = []

    def on_batch(self, state, batch, outputs, weight):
        self.losses.append(outputs.loss.item())


def test_the_logged_loss_averages_every_batch_since_the_last_log_across_epochs(tmp_path, parquet_dir, tiny_checkpoint):
    # 32 images / batch 16: 2 steps per epoch, so the window logged at step 3 spans the boundary after step 2.
    recorder = RecordBatchLosses()
    run([*TINY, "--train_dir", parquet_dir, "--max_train_samples", 32, "--max_steps", 3, "--logging_steps", 3,
         "--save_steps", 0, "--tokenizer_from", tiny_checkpoint, "--output_dir", tmp_path / "out"], hooks=[recorder])
    (logged,) = [m["train/loss"] for m in read_metrics(tmp_path / "out") if "train/loss" in m]
    assert len(recorder.losses) == 3
    assert logged == pytest.approx(sum(recorder.losses) / 3, rel=1e-6)
