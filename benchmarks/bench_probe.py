"""Linear probe: wall time and accuracy of the augmented probe (every epoch decodes, crops and encodes every image)
against `--cache_features` (encode each image once from its center crop, then train the head on the cached features),
on the same checkpoint, data, batch and schedule, through `run_linear_probe.main` in this process.

    python benchmarks/bench_probe.py                                     # 10k CIFAR-10 images, 15 epochs
    python benchmarks/bench_probe.py --model_name_or_path path/to/pretrained --epochs 20

Without --model_name_or_path the checkpoint is an ldae-tiny model whose PCA is fitted on 512 training images and whose
blocks keep their random initialisation. The result is flagged when cached features lose more than 1 point of top-1.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_ldae import LDAEConfig, LDAEForPreTraining, fit_patch_pca  # noqa: E402
from modeling_ldae.data import load_image_dataset, make_image_processor, pretrain_transform  # noqa: E402
from run_linear_probe import main as run_linear_probe  # noqa: E402

DEFAULT_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
MAX_TOP1_LOSS = 0.01


def tiny_checkpoint(cifar10: Path, folder: Path) -> Path:
    torch.manual_seed(0)
    config = LDAEConfig.from_preset("ldae-tiny")
    images = load_image_dataset(dataset_name=str(cifar10), split="train[:512]")
    transform = pretrain_transform(config.image_size)
    pixels = torch.stack([transform(image.convert("RGB")) for image in images["img"]])
    model = LDAEForPreTraining(config)
    model.set_pca(*fit_patch_pca(pixels.split(128), config.patch_size))
    model.save_pretrained(folder)
    make_image_processor(config.image_size).save_pretrained(folder)
    return folder


def probe(args, checkpoint: Path, output_dir: Path, cached: bool) -> tuple[float, dict]:
    argv = [
        "--model_name_or_path", str(checkpoint), "--dataset_name", str(args.cifar10_dir),
        "--max_train_samples", str(args.num_train), "--max_eval_samples", str(args.num_eval),
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--seed", str(args.seed),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(args.batch_size),
        "--num_train_epochs", str(args.epochs), "--warmup_epochs", str(args.warmup_epochs),
        "--base_learning_rate", str(args.base_learning_rate), "--save_strategy", "no", "--logging_steps", "50",
        "--dataloader_num_workers", str(args.workers), "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
    ]
    start = time.perf_counter()
    results = run_linear_probe(argv + (["--cache_features"] if cached else []))
    return time.perf_counter() - start, results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", type=Path, help="default: a random-init ldae-tiny with a fitted PCA")
    parser.add_argument("--cifar10_dir", type=Path, default=Path(os.environ.get("LDAE_CIFAR10_DIR", DEFAULT_CIFAR10)))
    parser.add_argument("--num_train", type=int, default=10_000)
    parser.add_argument("--num_eval", type=int, default=10_000)
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--warmup_epochs", type=float, default=1)
    parser.add_argument("--batch_size", type=int, default=256)
    # MAE's 0.1 is tuned for batch 16384 and 90 epochs; at batch 256 LARS then barely moves the head in 15 epochs.
    parser.add_argument("--base_learning_rate", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (decode + augmentation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.model_name_or_path or tiny_checkpoint(args.cifar10_dir, tmp / "checkpoint")
        runs = {}
        for mode, cached in (("augmented", False), ("cached_features", True)):
            wall, results = probe(args, checkpoint, tmp / mode, cached)
            assert results["probe_mode"] == mode
            runs[mode] = {"wall_s": round(wall, 1), "train_runtime_s": results["train_runtime"],
                          "top1": results["eval_top1"], "top5": results["eval_top5"]}

    loss = runs["augmented"]["top1"] - runs["cached_features"]["top1"]
    figures = {
        "checkpoint": str(args.model_name_or_path or "ldae-tiny, random blocks, PCA on 512 images"),
        "data": f"CIFAR-10: {args.num_train} train / {args.num_eval} test images",
        "schedule": f"{args.epochs:g} epochs ({args.warmup_epochs:g} warm-up), batch {args.batch_size}, LARS base lr "
                    f"{args.base_learning_rate:g}, {torch.get_num_threads()} threads, {args.workers} workers",
        "runs": runs,
        "speedup": round(runs["augmented"]["wall_s"] / runs["cached_features"]["wall_s"], 1),
        "cached_top1_loss_points": round(100 * loss, 2),
        "flag": loss > MAX_TOP1_LOSS,
    }
    print(json.dumps(figures, indent=2))
    print("\n| probe | wall time (s) | top-1 | top-5 |\n|---|---|---|---|")
    for mode, run in runs.items():
        print(f"| {mode} | {run['wall_s']} | {100 * run['top1']:.2f} | {100 * run['top5']:.2f} |")
    if figures["flag"]:
        print(f"\nFLAG: cached features lose {100 * loss:.2f} points of top-1 (more than {100 * MAX_TOP1_LOSS:g}).")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
