"""The deconstructive journey at CIFAR-10 scale: from DiT on a conv VAE's latent (2c) to l-DAE (4e).

    python benchmarks/cifar10_journey.py --plan                          # the jobs, what is done, hours left
    python benchmarks/cifar10_journey.py --output_dir ../ldae-journey [--hours 2.5] [--only '*-d8-seed0']

The CIFAR-10 study's regime and code (`reproduce_cifar10.py`: model, batch 32, base lr 8e-3, cosine, the probes),
one `run_pretrain.py --journey_stage STAGE` per DAE run, every one trained for the study's 3,099 steps (equal images
seen). The learning rate was tuned on l-DAE (stage 4e) and is used unchanged for every stage: no stage is tuned.
The learned tokenizers (patch AE, patch VAE, conv VAE) are trained once per (type, d) outside that budget, each with
a fixed budget stated below (`--tokenizer_only` into `<out>/tokenizers/<type>-d<d>/`), and reused with
`--tokenizer_from`; the patch PCA is fitted inside each run, as in the study (cheap: a second or so, and it keeps
4e the study's l-DAE exactly).

Jobs, in priority order: the sequence 2c -> 2d -> 3 (patch PCA) -> 4a ... 4e at d = 8 with seed 0, then seed 1, then
the tokenizer table (epsilon prediction, linear gamma^2; one seed) at d = 8, 16, 48 and 96 last (drop d = 96 first if
time runs short). At d = 8, the table's conv VAE cell is the run of stage 2d and its patch PCA cell the sequence's
stage 3. Two jobs run side by side, one thread each; each starts as soon as the tokenizer it needs exists. Every job
is resumable (DAE runs from their latest checkpoint, tokenizers from their last saved state): run the command again
after an interruption. Finished jobs and probe results are cached in `<out>/results.json`; after training, each
finished run is probed (cached-feature linear probe and k-NN on the full 50k / 10k split) and
`docs/results/cifar10-journey.md` is written from what exists (a hand-written reading below its marker line
survives). Stop with Ctrl-C: DAE runs checkpoint on SIGINT; a tokenizer loses at most its last `save_steps`.
"""

import argparse
import fnmatch
import json
import math
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import reproduce_cifar10 as study
import torch
from reproduce_cifar10 import READING_MARKER, REPO, Study, Variant, ldae_encoder

from modeling_ldae.configuration_ldae import JOURNEY_STAGES

DAE_STEPS = 3099  # the study's l-DAE runs: 10 min at its calibrated 165 images/s per run, batch 32 (cifar10.md)
SAVE_STEPS = 500  # a checkpoint every ~2 minutes of a DAE run
SEEDS = (0, 1)
SEQUENCE_DIM = 8  # the study's default d (d / D = 4%, the paper's 32 / 768)
SEQUENCE = ("2c", "2d", "3-patch-pca", "4a", "4b", "4c", "4d", "4e")
TABLE_STAGES = ("3-conv-vae", "3-patch-vae", "3-patch-ae", "3-patch-pca")
TABLE_DIMS = (8, 16, 48, 96)  # of D = 192 (conv VAE: d / 4 latent channels, so d divisible by 4)
assert JOURNEY_STAGES["2d"] == JOURNEY_STAGES["3-conv-vae"]  # so at d = 8 one run fills both tables
# Tokenizer budgets, fixed: (steps, batch), Adam at run_pretrain.py's constant 1e-3, its default KL weights. Measured
# 2026-12-03 on this machine (one thread, the other core busy): a conv VAE step takes 1.2 s of CPU at batch 64 and
# 6.3 s at batch 256 (53 vs 41 images/s: the smaller batch gets more steps from the same time), so 1,800 steps at
# batch 64 are ~37 min (115k images, 2.3 epochs); a patch AE / VAE step is 0.01-0.02 s of compute, and through
# run_pretrain.py (decoding 256 images a step) 7.3 steps/s: 3,000 steps at batch 256 (15 epochs) are ~5-7 min.
TOKENIZER_BUDGETS = {"conv_vae": (1800, 64), "patch_vae": (3000, 256), "patch_ae": (3000, 256)}
TOKENIZER_SAVE_STEPS = 200
# Wall-clock estimates on one core, for --plan: DAE steps took 0.156 s of CPU (PCA / patch tokenizers) and 0.20 s
# (conv VAE, which encodes every batch) in the same measurement; the study's 3,099 steps took 10 min with data.
MINUTES = {"pca": 10.0, "patch_ae": 10.0, "patch_vae": 10.0, "conv_vae": 12.5,
           "tokenizer-conv_vae": 40.0, "tokenizer-patch_vae": 7.0, "tokenizer-patch_ae": 7.0, "probe": 1.0}
# Paper (ImageNet, DiT-L encoder, linear probe top-1; docs/journey.md). Its 2c / 2d use a d = 16 conv latent
# (32 x 32 x 4 in 2 x 2 patches), its stage 3 on the patch PCA at d = 32, both of D = 768.
PAPER_SEQUENCE = {"2c": 59.0, "2d": 63.4, "3-patch-pca": 65.1, "4a": 62.4, "4b": 63.6, "4c": 63.6, "4d": 63.9,
                  "4e": 64.5}
PAPER_TABLE = {"3-conv-vae": (54.5, 63.4, 62.8, 57.0, 48.1), "3-patch-vae": (58.3, 64.9, 64.8, 56.8, None),
               "3-patch-ae": (59.9, 64.7, 64.6, 59.9, None), "3-patch-pca": (56.0, 63.4, 65.1, 60.0, 53.9)}
PAPER_DIMS = (8, 16, 32, 64, 128)  # of D = 768
DESCRIPTION = {"2c": "conv VAE (MSE + KL), DDPM linear beta, variance-preserving, predict eps",
               "2d": "noise schedule: linear gamma^2", "3-patch-pca": "tokenizer: patch PCA",
               "4a": "predict the clean latent (lambda = gamma^2)", "4b": "no scaling: z0 + sigma eps, linear sigma",
               "4c": "input: the image (inverse PCA), target still the latent",
               "4d": "target in image space: the projected image", "4e": "target: the original image, Eq. 4 (l-DAE)"}
TOKENIZER_LABEL = {"3-conv-vae": "conv VAE", "3-patch-vae": "patch VAE", "3-patch-ae": "patch AE", "3-patch-pca": "patch PCA"}


def tokenizer_type(stage: str) -> str:
    return JOURNEY_STAGES[stage]["tokenizer_type"]


def run_name(stage: str, d: int, seed: int) -> str:
    if stage == "3-conv-vae" and d == SEQUENCE_DIM:
        stage = "2d"
    return f"{stage}-d{d}-seed{seed}"


@dataclass
class Job:
    name: str
    folder: Path
    command: list[str]
    minutes: float  # estimated wall clock on one core
    needs: str | None = None  # the tokenizer job it waits for
    dae: bool = False  # a DAE run: probed when finished
    max_steps: int = DAE_STEPS  # of its training, for the time left in --plan


def build_jobs(args) -> list[Job]:
    """Every job in priority order, each tokenizer just before the first run that needs it."""
    out, data, smoke = Path(args.output_dir), Path(args.data_dir), args.smoke
    runs = [(stage, SEQUENCE_DIM, seed) for seed in SEEDS for stage in SEQUENCE]
    runs += [(stage, d, 0) for d in TABLE_DIMS for stage in TABLE_STAGES]
    jobs, names = [], set()
    for stage, d, seed in runs:
        name, kind = run_name(stage, d, seed), tokenizer_type(stage)
        if name in names:
            continue
        needs = None if kind == "pca" else f"tokenizer-{kind}-d{d}"
        if needs and needs not in names:
            steps, batch = (5, 16) if smoke else TOKENIZER_BUDGETS[kind]
            folder = out / "tokenizers" / f"{kind}-d{d}"
            command = study.pretrain_command(Variant(needs, "ldae", {"pca_dim": d}), data, folder, 1, "cpu",
                                             save_steps=TOKENIZER_SAVE_STEPS) + [
                "--journey_stage", f"3-{kind.replace('_', '-')}", "--tokenizer_only", "--tokenizer_max_steps",
                str(steps), "--per_device_train_batch_size", str(batch), "--logging_steps", "50"]
            jobs.append(Job(needs, folder, command + smoke_flags(smoke), MINUTES[f"tokenizer-{kind}"], max_steps=steps))
            names.add(needs)
        folder, steps = out / "runs" / name, 20 if smoke else DAE_STEPS
        variant = Variant(stage, "ldae", {"pca_dim": d, **study.OLD_INIT}, seed)
        command = study.pretrain_command(variant, data, folder, steps, "cpu", save_steps=10 if smoke else SAVE_STEPS)
        command += ["--journey_stage", stage] + (["--tokenizer_from", str(out / "tokenizers" / f"{kind}-d{d}")]
                                                 if needs else [])
        jobs.append(Job(name, folder, command + smoke_flags(smoke), MINUTES[kind], needs, dae=True, max_steps=steps))
        names.add(name)
    return jobs


def smoke_flags(smoke: bool) -> list[str]:
    return ["--pca_num_images", "500", "--monitor_steps", "10", "--logging_steps", "5"] if smoke else []


def select(jobs: list[Job], patterns: list[str] | None, done: set[str]) -> list[Job]:
    """The jobs matching any of `patterns` (fnmatch on names), plus the unfinished tokenizers they need."""
    if not patterns:
        return jobs
    chosen = {j.name for j in jobs if any(fnmatch.fnmatch(j.name, p) for p in patterns)}
    chosen |= {j.needs for j in jobs if j.name in chosen and j.needs and j.needs not in done}
    return [j for j in jobs if j.name in chosen]


def progress(job: Job) -> str:
    """Where an unfinished job stands on disk (it resumes from there)."""
    checkpoints = sorted(int(p.name.split("-")[1]) for p in job.folder.glob("checkpoint-*"))
    if checkpoints:
        return f"at step {checkpoints[-1]}"
    state = job.folder / "tokenizer-training" / "metrics.jsonl"
    if state.exists():
        return f"tokenizer logged to step {json.loads(state.read_text().splitlines()[-1])['step']}"
    return "to do"


# ---------------------------------------------------------------------------------------------- execution


def execute(jobs: list[Job], lab: Study, parallel: int, deadline: float) -> list[str]:
    """Run the unfinished jobs `parallel` at a time (each its own one-thread process), always the first ready one in
    priority order; none is started after `deadline`. A failed job is reported and its dependents skipped. Returns
    the names of the failed jobs."""
    finished = lab.results.setdefault("pretraining", {})
    pending = [j for j in jobs if j.name not in finished]
    lock, failed, running = threading.Lock(), [], {}

    def run(job: Job) -> None:
        resumed = progress(job) != "to do"
        start = time.time()
        study.run_logged(job.command + ["--resume_from_checkpoint", "latest"],
                         lab.output_dir / "logs" / f"{job.name}.log")
        with lock:
            finished[job.name] = {"path": str(job.folder), "wall_seconds": time.time() - start, "resumed": resumed}
            lab.results_path.write_text(json.dumps(lab.results, indent=1, sort_keys=True))
        print(f"[done] {job.name}: {(time.time() - start) / 60:.1f} min{' (resumed)' if resumed else ''}", flush=True)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while True:
            pending = [j for j in pending if j.needs not in failed]
            ready = [j for j in pending if j.needs is None or j.needs in finished]
            for job in ready[:parallel - len(running)] if time.time() < deadline else []:
                pending.remove(job)
                running[pool.submit(run, job)] = job
                print(f"[start] {job.name} (~{job.minutes:.0f} min)", flush=True)
            if not running:
                return failed
            for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                job = running.pop(future)
                if future.exception() is not None:
                    failed.append(job.name)
                    print(f"[failed] {job.name}: {future.exception()}", flush=True)


def show_plan(jobs: list[Job], lab: Study, parallel: int) -> None:
    finished, probes = lab.results.get("pretraining", {}), lab.results
    left, probes_left = 0.0, 0
    print(f"{'job':28s} {'needs':24s} {'est. min':>8s}  status")
    for job in jobs:
        if job.name in finished:
            status = f"done ({finished[job.name]['wall_seconds'] / 60:.0f} min)"
        else:
            status = progress(job)
            step = int(status.split()[-1]) if status != "to do" else 0
            left += job.minutes * (1 - step / job.max_steps)
        if job.dae:
            probe = probes.get(job.name)
            status += f"; probe {probe['linear_probe_top1']:.1f} / k-NN {probe['knn_top1']:.1f}" if probe else "; probe —"
            probes_left += probe is None
        print(f"{job.name:28s} {job.needs or '-':24s} {job.minutes:8.1f}  {status}")
    hours = left / 60 / parallel + probes_left * MINUTES["probe"] / 60
    tokenizers = sum(not j.dae for j in jobs)
    print(f"\n{sum(j.dae for j in jobs)} DAE runs, {tokenizers} tokenizers. Left: {left / 60:.1f} core-hours of "
          f"training ({left / 60 / parallel:.1f} h on {parallel} cores"
          f"{', a lower bound: a run may wait for its tokenizer' if tokenizers else ''}) + {probes_left} probes "
          f"(~{probes_left * MINUTES['probe'] / 60:.1f} h): ~{hours:.1f} h.")


class SmokeStudy(Study):
    """The probes on 2,000 train / 1,000 test images (for `--smoke` only)."""

    @property
    def data(self):
        return {split: (images[:n], labels[:n])
                for (split, (images, labels)), n in zip(super().data.items(), (2000, 1000))}


# ---------------------------------------------------------------------------------------------- report


def summary(values: list[float]) -> tuple[float, float] | None:
    """Mean and half the spread of the seeds measured (None: none yet)."""
    return (sum(values) / len(values), (max(values) - min(values)) / 2) if values else None


def seeds_cell(values: list[float]) -> str:
    mean, half_spread = summary(values) or (None, None)
    return "—" if mean is None else f"{mean:.1f} ± {half_spread:.1f}" if len(values) > 1 else f"{mean:.1f} (1 seed)"


def plot_trajectory(rows: list[tuple[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, here = plt.subplots(figsize=(7, 3.6))
    x = range(len(rows))
    for i, (stage, values) in enumerate(rows):
        here.plot([i] * len(values), values, ".", color="tab:blue", alpha=0.5)
    means = [(i, summary(v)) for i, (_, v) in enumerate(rows) if v]
    here.errorbar([i for i, _ in means], [m for _, (m, _) in means], [s for _, (_, s) in means], fmt="o-",
                  color="tab:blue", capsize=3, label="here: CIFAR-10 (mean, half-spread, seeds)")
    here.set(xlabel="stage", ylabel="CIFAR-10 linear probe top-1 (%)", title="The journey from 2c to l-DAE (4e)")
    here.set_xticks(list(x), [stage for stage, _ in rows])
    paper = here.twinx()
    paper.plot(list(x), [PAPER_SEQUENCE[stage] for stage, _ in rows], "s--", color="tab:orange",
               label="paper: ImageNet (right axis)")
    paper.set_ylabel("ImageNet linear probe top-1 (%)", color="tab:orange")
    figure.legend(loc="lower center", ncol=2, fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def write_report(lab: Study, jobs: list[Job], path: Path, args) -> None:
    results, runs, out = lab.results, lab.results.get("pretraining", {}), lab.output_dir
    measured = lambda names, metric="linear_probe_top1": [results[n][metric] for n in names if n in results]
    cell = lambda number: "—" if number is None else f"{number:.1f}"
    one = lambda name, metric="linear_probe_top1": cell(results.get(name, {}).get(metric))
    rows, sequence, before = [], [], None
    for stage in SEQUENCE:
        names = [run_name(stage, SEQUENCE_DIM, seed) for seed in SEEDS]
        top1, change, verdict = measured(names), "—", "—"
        rows.append((stage, top1))
        if len(top1) > 1 and before is not None and len(before) > 1:  # both stages have every seed
            (mean, spread), (old_mean, old_spread) = summary(top1), summary(before)
            bar = 2 * max(spread, old_spread)
            change, verdict = f"{mean - old_mean:+.1f}", f"{'yes' if abs(mean - old_mean) > bar else 'no'} (bar {bar:.1f})"
        sequence.append(f"| {stage} | {DESCRIPTION[stage]} | {PAPER_SEQUENCE[stage]} | "
                        + " | ".join(one(n) for n in names) + f" | {seeds_cell(top1)} | "
                        f"{seeds_cell(measured(names, 'knn_top1'))} | {change} | {verdict} |")
        before = top1
    folder = path.with_suffix("")
    plot_trajectory(rows, folder / "trajectory.png")
    lines = [
        "# The deconstructive journey at CIFAR-10 scale: from DiT's recipe (2c) to l-DAE (4e)", "", study.INIT_NOTE, "",
        *([("**Smoke test (`--smoke`): 20 DAE steps, 5 tokenizer steps, probes on 2k / 1k images; the numbers "
            "mean nothing.**"), ""] if args.smoke else []),
        ("Command: `python benchmarks/cifar10_journey.py --output_dir <folder>` (resumable; `--plan` shows what is "
         f"done). Regime of [the CIFAR-10 study](cifar10.md): 32 px, patch 8 (D = 192), width 192, 4 + 4 blocks; "
         f"every DAE run trains {DAE_STEPS:,} steps of batch {study.BATCH_SIZE} ({DAE_STEPS * study.BATCH_SIZE:,} "
         f"images), base lr {study.BASE_LEARNING_RATE:g}, {study.WARMUP_FRACTION:.0%} warm-up, cosine. **The learning "
         "rate was tuned on l-DAE (stage 4e)** and is used unchanged for every stage; no stage was tuned. 4e is the "
         "study's l-DAE recipe exactly, rerun here (the study's run folders were not kept). Each stage is "
         "`run_pretrain.py --journey_stage` ([journey.md](../journey.md): what each stage is, and the choices the "
         "paper leaves open).  "),
        "Tokenizers, trained once per (type, d) outside the DAE budget (Adam at a constant 1e-3, KL weight 0.01 "
        "patch VAE, 1e-6 conv VAE), then frozen: " + ", ".join(
            f"{kind.replace('_', ' ')} {steps:,} steps of batch {batch}" for kind, (steps, batch) in
            TOKENIZER_BUDGETS.items()) + "; the patch PCA is fitted in each run on 10,000 training images.  ",
        (f"Probes (every run the same): the cached-feature linear probe (BatchNorm + Linear, LARS, "
         f"{args.probe_epochs} epochs) and k-NN top-1 (k = 20) on the full 50k / 10k split, features of the encoder "
         "half at t = 10 on the clean input. Seeds: mean ± half the spread; a change between stages is called real "
         "only where it exceeds twice the larger half-spread of the two (the bar)."), "",
        f"## 1. The sequence at d = {SEQUENCE_DIM} (d / D = 4%, the paper's 32 / 768), two seeds", "",
        "| stage | change | paper (ImageNet) | seed 0 | seed 1 | linear probe | k-NN | vs previous | real? |",
        "|---|---|---|---|---|---|---|---|---|", *sequence, "",
        ("Paper: DiT-L, 400 epochs, linear probe; d = 16 (its conv latent) in 2c / 2d, patch PCA at d = 32 from "
         "stage 3 on."), "", f"![trajectory]({folder.name}/trajectory.png)", "",
        "## 2. Tokenizers (paper Tab. 2): epsilon prediction, linear gamma^2, one seed (seed 0)", "",
        "| linear probe (k-NN) | " + " | ".join(f"d = {d} ({d / 192:.0%})" for d in TABLE_DIMS) + " |",
        "|---|" + "---|" * len(TABLE_DIMS)]
    lines += [f"| {TOKENIZER_LABEL[stage]} | " + " | ".join(
        f"{one(run_name(stage, d, 0))} ({one(run_name(stage, d, 0), 'knn_top1')})" for d in TABLE_DIMS) + " |"
        for stage in TABLE_STAGES]
    lines += ["", "Paper (ImageNet, D = 768; its 128 column is partly missing in the source):", "",
              "| linear probe | " + " | ".join(f"d = {d} ({d / 768:.0%})" for d in PAPER_DIMS) + " |",
              "|---|" + "---|" * len(PAPER_DIMS)]
    lines += [f"| {TOKENIZER_LABEL[stage]} | " + " | ".join(cell(v) for v in PAPER_TABLE[stage]) + " |"
              for stage in TABLE_STAGES]
    lines += ["", (f"At d = {SEQUENCE_DIM} the conv VAE cell is stage 2d's run and the patch PCA cell stage 3's "
                   "(seed 0; both seeds are in section 1)."), "",
              "## 3. The tokenizers' reconstructions (held-out test images in [-1, 1]; from each tokenizer.json)", "",
              "| tokenizer | d | trained | per-pixel MSE | patch PCA at the same d | active dims | latent std |",
              "|---|---|---|---|---|---|---|"]
    for stage in TABLE_STAGES:
        kind = tokenizer_type(stage)
        for d in TABLE_DIMS:
            where = out / "runs" / run_name(stage, d, 0) if kind == "pca" else out / "tokenizers" / f"{kind}-d{d}"
            if not (where / "tokenizer" / "tokenizer.json").exists():
                lines.append(f"| {TOKENIZER_LABEL[stage]} | {d} | — | — | — | — | — |")
                continue
            figures = json.loads((where / "tokenizer" / "tokenizer.json").read_text())["figures"]
            own, training = figures["tokenizer"], figures.get("training")
            lines.append(
                f"| {TOKENIZER_LABEL[stage]} | {d} | " + (f"{training['steps']:,} steps, KL weight {training['kl_weight']:g}"
                                                      f", latent scale {training['latent_scale']:.3g}" if training
                                                      else "fitted") +
                f" | {own['reconstruction_mse']:.4f} | {figures['pca']['reconstruction_mse']:.4f} | "
                f"{own['active_dimensions']} of {own['num_dimensions']} | "
                f"{min(own['latent_std']):.2f}-{max(own['latent_std']):.2f} |")
    walls = {conv: [runs[j.name]["wall_seconds"] / 60 for j in jobs if j.dae and j.name in runs
                    and not runs[j.name]["resumed"] and (j.needs or "").startswith("tokenizer-conv_vae") == conv]
             for conv in (True, False)}
    lines += ["", "## Every job", "", "Wall clock of uninterrupted DAE runs (two side by side, one thread each): "
              + "; ".join(f"{label} {sum(w) / len(w):.1f} min ({len(w)} runs)" if w else f"{label} —"
                          for label, w in (("conv VAE tokenizer (it encodes every batch)", walls[True]),
                                           ("the others", walls[False]))) + ".", "",
              *job_table(jobs, results)]
    write_keeping_reading(path, lines)


def job_table(jobs: list[Job], results: dict) -> list[str]:
    """Every job's wall clock (of its last segment if it was resumed) and probe figures."""
    runs = results.get("pretraining", {})
    figure = lambda name, metric: f"{results[name][metric]:.1f}" if name in results else "—"  # noqa: E731
    lines = ["| job | wall clock (min) | linear probe | (train) | k-NN |", "|---|---|---|---|---|"]
    for job in jobs:
        run = runs.get(job.name)
        wall = "—" if run is None else f"{run['wall_seconds'] / 60:.1f}{' (last segment)' if run['resumed'] else ''}"
        lines.append(f"| {job.name} | {wall} | {figure(job.name, 'linear_probe_top1')} | "
                     f"{figure(job.name, 'linear_probe_train_top1')} | {figure(job.name, 'knn_top1')} |")
    return lines


def write_keeping_reading(path: Path, lines: list[str]) -> None:
    """Write a report's generated `lines`, then the marker line and the hand-written reading below the marker in
    the file already there (if any)."""
    reading = path.read_text().split(READING_MARKER, 1)[1] if path.exists() and READING_MARKER in path.read_text() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + f"\n\n{READING_MARKER}{reading or chr(10)}")


def study_parser(description: str, name: str, only_help: str, smoke_help: str) -> argparse.ArgumentParser:
    """The flags of every resumable CIFAR-10 study command (this one, the attribution study): `name` gives the
    default output folder ../ldae-<name> and report docs/results/cifar10-<name>.md."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help=f"default: ../ldae-{name} (--smoke: /tmp/ldae-{name}-smoke)")
    parser.add_argument("--data_dir", default=os.environ.get("LDAE_CIFAR10_DIR",
                                                             str(REPO.parent / "shared/datasets/cifar10")))
    parser.add_argument("--plan", action="store_true", help="print the jobs, what is done and the time left; run nothing")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help=only_help)
    parser.add_argument("--hours", type=float, default=math.inf, help="start no job after this many hours")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from results.json")
    parser.add_argument("--report_file", help=f"default: docs/results/cifar10-{name}.md (--smoke: in the output folder)")
    parser.add_argument("--parallel_runs", type=int, default=2, help="jobs side by side, one thread each")
    parser.add_argument("--threads", type=int, default=2, help="threads for feature extraction and probes")
    parser.add_argument("--probe_epochs", type=int, default=90)
    parser.add_argument("--probe_base_learning_rate", type=float, default=0.1 * 1_281_167 / 50_000)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    return parser


def parse_study_args(parser: argparse.ArgumentParser, argv, name: str) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.device = "cpu"
    args.output_dir = args.output_dir or (f"/tmp/ldae-{name}-smoke" if args.smoke else str(REPO.parent / f"ldae-{name}"))
    args.report_file = args.report_file or str(Path(args.output_dir) / f"cifar10-{name}.md" if args.smoke else
                                               REPO / "docs" / "results" / f"cifar10-{name}.md")
    if args.smoke:
        args.probe_epochs = 2
    return args


def main(argv=None):
    parser = study_parser(__doc__, "journey",
                          only_help="only the jobs whose names match (fnmatch, e.g. '*-d8-seed0' 'tokenizer-*'); the "
                                    "tokenizers they need come along",
                          smoke_help="the whole pipeline in minutes: 20 DAE steps, 5 tokenizer steps, probes on 2k / 1k "
                                     "images for 2 epochs (numbers meaningless)")
    args = parse_study_args(parser, argv, "journey")
    lab = (SmokeStudy if args.smoke else Study)(args)
    jobs = build_jobs(args)
    selected = select(jobs, args.only, set(lab.results.get("pretraining", {})))
    if args.plan:
        return show_plan(selected, lab, args.parallel_runs)
    run_study(lab, jobs, selected, args, probe_runs, write_report, folders=("runs", "tokenizers", "logs", "probes"))


def probe_runs(lab: Study, jobs: list[Job], args) -> None:
    for job in jobs:
        if job.dae and job.name in lab.results["pretraining"]:
            lab.evaluate(job.name, lambda folder=job.folder: ldae_encoder(folder, args.device))


def run_study(lab: Study, jobs: list[Job], selected: list[Job], args, evaluate, write_report,
              folders: tuple[str, ...]) -> None:
    """Unless --report: train the unfinished `selected` jobs, then `evaluate(lab, selected, args)` them (probes are
    cached). Then the report of all `jobs`, from what exists; a failed job fails the command after it."""
    failed = []
    if not args.report:
        for folder in folders:
            (lab.output_dir / folder).mkdir(parents=True, exist_ok=True)
        failed = execute(selected, lab, args.parallel_runs, time.time() + 3600 * args.hours)
        torch.set_num_threads(args.threads)
        evaluate(lab, selected, args)
    write_report(lab, jobs, Path(args.report_file), args)
    print(f"report written to {args.report_file}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see {lab.output_dir / 'logs'})")


if __name__ == "__main__":
    main()
