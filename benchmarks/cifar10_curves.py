"""Learning curves at CIFAR-10 scale: where l-DAE is heading, not a 2-epoch snapshot.

    python benchmarks/cifar10_curves.py --output_dir ../ldae-curves [--pretrain_minutes 60]

The CIFAR-10 study's regime and code (`reproduce_cifar10.py`: model sizes, batch 32, learning rate, the probes), but
each headline variant pre-trained once for longer, under a schedule whose intermediate points mean something: linear
warm-up over the first 5% of the planned steps, then a constant learning rate (`--lr_scheduler_type
constant_with_warmup`), the same for every variant. A checkpoint is kept every half epoch (no rotation), and the
probes (cached-feature linear probe and k-NN on the full 50k / 10k split) judge the checkpoints at geometrically spaced
points (0.5, 1, 2, 4, 8 epochs). Variants: l-DAE at the default d = 8, l-DAE at d = 48 (the study's best d), the
pixel DAE (d = D = 192) and ViTMAE through the same loop; random networks and raw pixels are the reference lines.

All variants train at once (one thread each), so at any moment they have seen about the same number of images and a
run cut short by `--pretrain_minutes` leaves comparable points for every variant: at the deadline each run gets
SIGTERM, checkpoints and stops; the next call resumes it (exactly: map-style data, constant learning rate). Probes
are cached in `results.json`. The report `docs/results/cifar10-curves.md` is written from what exists; a hand-written
reading below its marker line survives regeneration.
"""

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import reproduce_cifar10 as study
import torch
from reproduce_cifar10 import REPO, Study, Variant, ldae_encoder, mae_encoder, random_ldae, run_metrics

EPOCH_STEPS = math.ceil(50_000 / study.BATCH_SIZE)  # optimizer steps per CIFAR-10 epoch
CHECKPOINT_STEPS = round(EPOCH_STEPS / 2)  # a checkpoint every half epoch
CURVE_POINTS = (1, 2, 4, 8, 16)  # in half epochs: 0.5, 1, 2, 4, 8 epochs
VARIANTS = (Variant("ldae-d8", "ldae", {"pca_dim": study.DEFAULT_PCA_DIM, **study.OLD_INIT}),
            Variant("pixel-dae", "ldae", {"pca_dim": 192, **study.OLD_INIT}),
            Variant("ldae-d48", "ldae", {"pca_dim": 48, **study.OLD_INIT}),
            Variant("mae", "mae"))
REFERENCES = ("random-vit", "random-ldae", "raw-pixels")
PAIRS = (("ldae-d8", "pixel-dae"), ("ldae-d8", "random-vit"), ("ldae-d8", "mae"), ("ldae-d48", "pixel-dae"))
TIMESTEPS = (10, 250, 500, 750, 999)
READING_MARKER = study.READING_MARKER


def curve_command(variant: Variant, data_dir: Path, run_dir: Path, device: str) -> list[str]:
    return study.pretrain_command(variant, data_dir, run_dir, CHECKPOINT_STEPS * CURVE_POINTS[-1], device,
                                  save_steps=CHECKPOINT_STEPS, save_total_limit=None, monitor_steps=CHECKPOINT_STEPS,
                                  lr_scheduler_type="constant_with_warmup")


def pretrain_all(data_dir: Path, output_dir: Path, device: str, minutes: float) -> None:
    """Every variant at once, each resumed from its latest checkpoint; at the deadline each is stopped with SIGTERM
    (it checkpoints first). A run that finished is not started again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    running = {}
    for variant in VARIANTS:
        run_dir = output_dir / "runs" / variant.name
        if (run_dir / "config.json").exists():
            continue
        log = open(output_dir / "logs" / f"{variant.name}.log", "a")
        command = [sys.executable, str(REPO / "run_pretrain.py"),
                   *curve_command(variant, data_dir, run_dir, device), "--resume_from_checkpoint", "latest"]
        running[variant.name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + 60 * minutes
    while any(process.poll() is None for process in running.values()) and time.time() < deadline:
        time.sleep(10)
    for process in running.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for name, process in running.items():
        code = process.wait()
        if code not in (0, 128 + signal.SIGTERM):
            raise RuntimeError(f"{name} failed (exit {code}); see {output_dir / 'logs' / name}.log")
        print(f"[pretrain] {name}: {'finished' if code == 0 else 'paused (resumes on the next call)'}", flush=True)


def checkpoint_dir(output_dir: Path, name: str, half_epochs: int) -> Path:
    return output_dir / "runs" / name / f"checkpoint-{CHECKPOINT_STEPS * half_epochs}"


def evaluate_all(lab: Study, output_dir: Path, device: str) -> dict:
    """Probe every curve point that exists (the earliest points first) and the reference encoders; cached."""
    table = {"random-vit": lab.evaluate("random-vit", lambda: ldae_encoder(random_ldae(0, True), device)),
             "random-ldae": lab.evaluate("random-ldae", lambda: ldae_encoder(random_ldae(0, False), device)),
             "raw-pixels": lab.evaluate("raw-pixels", lambda: (lambda images: images.flatten(1)))}
    for point in CURVE_POINTS:
        for variant in VARIANTS:
            path = checkpoint_dir(output_dir, variant.name, point)
            if not path.exists():
                continue
            encoder = mae_encoder if variant.kind == "mae" else ldae_encoder
            table[f"{variant.name}@{point}"] = lab.evaluate(f"{variant.name}@{point}",
                                                            lambda p=path, e=encoder: e(p, device))
    return table


def health(output_dir: Path, name: str) -> dict[int, dict[int, float]]:
    """Per curve point: the held-out loss over the loss of copying the noisy input, per t (< 1: it denoises)."""
    records = {m["step"]: m for m in run_metrics(output_dir / "runs" / name) if "monitor/loss" in m}
    return {point: {t: records[step][f"monitor/loss_t{t}"] / records[step][f"monitor/copy_loss_t{t}"]
                    for t in TIMESTEPS}
            for point in CURVE_POINTS if (step := CHECKPOINT_STEPS * point) in records}


def write_report(table: dict, output_dir: Path, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in CURVE_POINTS if any(f"{v.name}@{p}" in table for v in VARIANTS)]
    images = {p: p * CHECKPOINT_STEPS * study.BATCH_SIZE for p in CURVE_POINTS}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, title in zip(axes, ("linear_probe_top1", "knn_top1"), ("linear probe", "k-NN (k = 20)")):
        for variant in VARIANTS:
            shown = [p for p in points if f"{variant.name}@{p}" in table]
            axis.plot([images[p] for p in shown], [table[f"{variant.name}@{p}"][metric] for p in shown], "o-",
                      label=variant.name)
        for reference, style in zip(REFERENCES, (":", "-.", "--")):
            axis.axhline(table[reference][metric], color="gray", linestyle=style, label=reference)
        axis.set_xscale("log")
        axis.set_xlabel("images seen")
        axis.set_ylabel("CIFAR-10 top-1 (%)")
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    figure.savefig(folder / "curves.png", dpi=120)

    def cell(name, point, metric):
        key = f"{name}@{point}" if name not in REFERENCES else name
        return f"{table[key][metric]:.1f}" if key in table else "-"

    header = "| variant | " + " | ".join(f"{p / 2:g} ep ({images[p] / 1000:.0f}k images)" for p in points) + " |"
    rule = "|---|" + "---|" * len(points)
    lines = ["# l-DAE at CIFAR-10 scale: learning curves", "", study.INIT_NOTE, "",
             f"Command: `python benchmarks/cifar10_curves.py --output_dir <folder>` (resumable; checkpoints "
             "every half epoch, none deleted). Regime as in [the CIFAR-10 study](cifar10.md): 32 px, patch 8 "
             f"(D = 192), width 192, 4 + 4 blocks, batch {study.BATCH_SIZE}, base lr {study.BASE_LEARNING_RATE:g}; "
             "schedule: linear warm-up over the first 5% of the planned 8 epochs, then constant "
             "(`constant_with_warmup`, the same for every variant), so that every point is a model a run could "
             "stop at. One seed per point. Probes: the package's cached-feature linear probe (BatchNorm + Linear, "
             f"LARS, {args.probe_epochs} epochs) and k-NN top-1 on the full 50k / 10k split.", "",
             f"![curves]({folder.name}/curves.png)", ""]
    for metric, title in (("linear_probe_top1", "Linear probe top-1 (%)"), ("knn_top1", "k-NN top-1 (%)")):
        lines += [f"## {title}", "", header, rule]
        lines += [f"| {v.name} | " + " | ".join(cell(v.name, p, metric) for p in points) + " |" for v in VARIANTS]
        lines += [f"| {r} (reference) | " + " | ".join(cell(r, p, metric) for p in points) + " |" for r in REFERENCES]
        lines.append("")
    lines += ["## Gaps (linear probe / k-NN points; positive: the first is ahead)", "", header, rule]
    for first, second in PAIRS:
        gaps = []
        for p in points:
            a = table.get(f"{first}@{p}")
            b = table.get(second) if second in REFERENCES else table.get(f"{second}@{p}")
            gaps.append("-" if a is None or b is None else
                        f"{a['linear_probe_top1'] - b['linear_probe_top1']:+.1f} / {a['knn_top1'] - b['knn_top1']:+.1f}")
        lines.append(f"| {first} - {second} | " + " | ".join(gaps) + " |")
    lines += ["", "## Health: held-out loss / loss of copying the noisy input, per t (< 1: it denoises)", "",
              "| run @ point | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " |", "|---|" + "---|" * len(TIMESTEPS)]
    for variant in VARIANTS:
        if variant.kind == "ldae":
            for point, ratios in health(output_dir, variant.name).items():
                lines.append(f"| {variant.name} @ {point / 2:g} ep | " + " | ".join(f"{ratios[t]:.2f}" for t in TIMESTEPS)
                             + " |")
    reading = ""
    if path.exists() and READING_MARKER in path.read_text():
        reading = path.read_text().split(READING_MARKER, 1)[1]
    path.write_text("\n".join(lines) + f"\n\n{READING_MARKER}{reading or chr(10)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(REPO.parent / "ldae-curves"))
    parser.add_argument("--data_dir", default=os.environ.get("LDAE_CIFAR10_DIR",
                                                             str(REPO.parent / "shared/datasets/cifar10")))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pretrain_minutes", type=float, default=120.0,
                        help="pre-training wall clock of this call (all variants at once); 0: probe what exists")
    parser.add_argument("--threads", type=int, default=2, help="threads for feature extraction and probes")
    parser.add_argument("--probe_epochs", type=int, default=90)
    parser.add_argument("--probe_base_learning_rate", type=float, default=0.1 * 1_281_167 / 50_000)
    parser.add_argument("--report", default=str(REPO / "docs" / "results" / "cifar10-curves.md"))
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    for folder in ("runs", "logs", "probes"):
        (output_dir / folder).mkdir(parents=True, exist_ok=True)
    if args.pretrain_minutes > 0:
        pretrain_all(Path(args.data_dir), output_dir, args.device, args.pretrain_minutes)
    torch.set_num_threads(args.threads)
    table = evaluate_all(Study(args), output_dir, args.device)
    write_report(table, output_dir, Path(args.report), args)
    print(f"report written to {args.report}")


if __name__ == "__main__":
    main()
