"""Pre-training throughput: the full `run_pretrain.py` loop (data + step) against the model-only step of the same
preset in the same process, JPEG decode + augmentation per loader worker, and peak memory per preset and batch.

    python benchmarks/bench_pretrain.py                      # GPU: ViT-B, 256 px, batch 256, bf16
    python benchmarks/bench_pretrain.py --memory ldae-vit-large:64 ldae-vit-large:256:gc
    python benchmarks/bench_pretrain.py --preset ldae-tiny --batch_size 64 --mixed_precision no   # CPU smoke run
    python benchmarks/bench_pretrain.py --ownership       # + the step while owning the output folder

The images are generated ImageNet-sized JPEGs (500 x 375, multi-octave noise: about ImageNet's file size), written
as a parquet shard that the loop reads map-style like any local data set. Workers needed per GPU = model-only
images/s divided by one worker's decode + augmentation images/s.

`--ownership`: the output folder's owner (`modeling_ldae.ownership`) adds nothing to a step; its heartbeat thread
writes a small file every 15 s. The model-only step is timed in alternating rounds without and with an owned
folder whose heartbeat runs every 50 ms (300 times the default rate); the median ratio and the cost of one
heartbeat write are printed.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_pretrain  # noqa: E402
from modeling_ldae import LDAEConfig, LDAEForPreTraining  # noqa: E402
from modeling_ldae.pretraining import enable_activation_checkpointing  # noqa: E402
from modeling_ldae.data import decode_image, pretrain_transform  # noqa: E402
from modeling_ldae.monitors import read_metrics  # noqa: E402
from modeling_ldae.ownership import own_output_dir  # noqa: E402

WIDTH, HEIGHT = 500, 375


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.float32)
    for octave in range(1, 10):  # texture at every scale, down to single pixels: JPEG sizes near real photos'
        cells = (max(2, HEIGHT >> (9 - octave)), max(2, WIDTH >> (9 - octave)))
        layer = Image.fromarray((rng.random((*cells, 3)) * 255).astype(np.uint8)).resize((WIDTH, HEIGHT),
                                                                                          Image.BICUBIC)
        image += np.asarray(layer, dtype=np.float32) / octave**0.25
    image = 255 * (image - image.min()) / (image.max() - image.min())
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def generate_jpegs(count: int) -> list[bytes]:
    with Pool(os.cpu_count()) as pool:
        return pool.map(_jpeg, range(count))


def decode_throughput(jpegs: list[bytes], image_size: int, random_resized_crop: bool) -> float:
    """Images/s of decode + augmentation on one core (a DataLoader worker runs single-threaded)."""
    torch.set_num_threads(1)
    transform = pretrain_transform(image_size, random_resized_crop=random_resized_crop)
    start = time.perf_counter()
    for data in jpegs:
        transform(decode_image({"bytes": data, "path": None}))
    elapsed = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count())
    return len(jpegs) / elapsed


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(preset: str, gradient_checkpointing: bool = False) -> LDAEForPreTraining:
    config = LDAEConfig.from_preset(preset)
    model = LDAEForPreTraining(config)
    dim = config.patch_dim  # a valid fitted PCA; its values do not change the cost
    model.set_pca(torch.zeros(dim), torch.eye(dim), torch.linspace(1, 0.01, dim))
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.to(_device()).train()


def model_only_throughput(preset: str, batch_size: int, steps: int, warmup: int, mixed_precision: str) -> float:
    """Images/s of forward + backward + AdamW step on a batch already on the device."""
    model = _model(preset)
    device = _device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    pixels = torch.rand(batch_size, 3, model.config.image_size, model.config.image_size, device=device) * 2 - 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    for step in range(warmup + steps):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(pixel_values=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    elapsed = time.perf_counter() - start
    del model, optimizer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return steps * batch_size / elapsed


def loop_throughput(jpegs: list[bytes], args) -> float:
    """Images/s that `run_pretrain.main` logs, median over the logging windows after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        # Enough rows that the timed steps stay inside one epoch: an epoch start stalls until the first batch is
        # decoded, a cost a real data set (thousands of steps per epoch) pays once per epoch.
        needed = (args.warmup + args.steps + 1) * args.batch_size
        rows = [{"bytes": jpegs[i % len(jpegs)], "path": None} for i in range(max(needed, len(jpegs)))]
        datasets.Dataset.from_dict({"image": rows}, features=datasets.Features(image=datasets.Image())) \
            .to_parquet(data_dir / "train-00000-of-00001.parquet")
        log_every = max(1, args.steps // 8)
        run_pretrain.main([
            "--train_dir", str(data_dir), "--output_dir", str(Path(tmp) / "out"), "--model_preset", args.preset,
            "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.warmup + args.steps),
            "--warmup_steps", "1", *(["--bf16", "true"] if args.mixed_precision == "bf16" else []),
            "--dataloader_num_workers", str(args.workers), "--logging_steps", str(log_every),
            "--monitor_steps", "0", "--save_steps", "0", "--pca_num_images", "256",
            "--pca_num_patches", "65536", *(["--random_resized_crop", "true"] if args.random_resized_crop else []),
        ])
        windows = [m["train/images_per_second"] for m in read_metrics(Path(tmp) / "out") if "train/loss" in m]
        skip = -(-args.warmup // log_every)  # windows that include warm-up steps
        return statistics.median(windows[skip:] or windows)


def ownership_cost(args, rounds: int = 5) -> dict[str, float]:
    """Model-only images/s while owning a folder (heartbeat every 50 ms) over those without, median of alternating
    rounds (the machine's drift cancels), and the milliseconds of one heartbeat write."""
    os.environ["LDAE_OWNER_TIMEOUT"] = "0.4"  # a heartbeat every 0.4 / 8 s
    measure = lambda: model_only_throughput(args.preset, args.batch_size, args.steps, args.warmup,  # noqa: E731
                                            args.mixed_precision)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            plain = measure()
            with own_output_dir(Path(tmp) / "out", "bench_pretrain.py") as owner:
                ratios.append(measure() / plain)
                start = time.perf_counter()
                for _ in range(100):
                    owner.refresh()
                write_ms = (time.perf_counter() - start) * 10
    return {"owned_over_plain_step_heartbeat_50ms": round(statistics.median(ratios), 3),
            "owned_over_plain_rounds": [round(ratio, 3) for ratio in ratios],
            "heartbeat_write_ms": round(write_ms, 3)}


def peak_memory(spec: str, mixed_precision: str) -> str:
    """`preset:batch[:gc]` -> peak GiB of two training steps (model, AdamW, activations), or OOM."""
    preset, batch, *rest = spec.split(":")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model = _model(preset, gradient_checkpointing="gc" in rest)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        size = model.config.image_size
        pixels = torch.rand(int(batch), 3, size, size, device="cuda") * 2 - 1
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
                loss = model(pixel_values=pixels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        result = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    except torch.OutOfMemoryError:
        result = "OOM"
    finally:
        model = optimizer = pixels = loss = None
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--preset", default="ldae-vit-base" if gpu else "ldae-tiny")
    parser.add_argument("--batch_size", type=int, default=256 if gpu else 64)
    parser.add_argument("--steps", type=int, default=40 if gpu else 16)
    parser.add_argument("--warmup", type=int, default=8 if gpu else 4)
    parser.add_argument("--mixed_precision", default="bf16" if gpu else "no")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--num_images", type=int, default=2048 if gpu else 256)
    parser.add_argument("--random_resized_crop", action="store_true", help="Loop with RRC + flip (center crop).")
    parser.add_argument("--memory", nargs="*", default=[], help="preset:batch[:gc] specs to measure (GPU).")
    parser.add_argument("--ownership", action="store_true", help="The step while owning the output folder.")
    parser.add_argument("--skip_loop", action="store_true")
    parser.add_argument("--output", help="Also write the results as JSON here.")
    args = parser.parse_args()

    results = {"device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)",
               "preset": args.preset, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision}
    image_size = LDAEConfig.from_preset(args.preset).image_size
    if not args.skip_loop:
        jpegs = generate_jpegs(args.num_images)
        results["mean_jpeg_kb"] = round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1)
        sample = jpegs[: min(len(jpegs), 300)]
        results["decode_center_crop_img_s_per_worker"] = round(decode_throughput(sample, image_size, False), 1)
        results["decode_rrc_flip_img_s_per_worker"] = round(decode_throughput(sample, image_size, True), 1)
        model_only = model_only_throughput(args.preset, args.batch_size, args.steps, args.warmup,
                                           args.mixed_precision)
        results["model_only_img_s"] = round(model_only, 1)
        loop = loop_throughput(jpegs, args)
        results["loop_img_s"] = round(loop, 1)
        results["loop_workers"] = args.workers
        results["loop_over_model_only"] = round(loop / model_only, 3)
        for name in ("center_crop", "rrc_flip"):
            per_worker = results[f"decode_{name}_img_s_per_worker"]
            results[f"workers_per_gpu_{name}"] = int(np.ceil(model_only / per_worker))
    if args.ownership:
        results.update(ownership_cost(args))
    for spec in args.memory:
        results[f"peak_memory[{spec}]"] = peak_memory(spec, args.mixed_precision)
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
