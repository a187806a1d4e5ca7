"""Why l-DAE (4e) trails its own stage 3 at CIFAR-10 scale: the attribution study of issue 19 (section 4).

    python benchmarks/cifar10_attribution.py --plan                         # the jobs, what is done, hours left
    python benchmarks/cifar10_attribution.py --output_dir ../ldae-attribution [--hours 3] [--only '*-seed0']
    python benchmarks/cifar10_attribution.py --best 4e-snr                  # cells 3 and 4 on the best of cell 2

The journey's regime and code (`cifar10_journey.py`: d = 8, 3,099 steps of batch 32, lr 0.008, width 192, 4 + 4
blocks, the same probes), each run one `run_pretrain.py --journey_stage STAGE --config_overrides ...`, trained from
the fixed (zero, adaLN-Zero) init unless a cell says otherwise. Cells, in priority order:
  0. stage 3 and 4e under the fixed init: the baseline of every comparison below (under the old xavier init they
     are the journey's runs: their figures are taken from its page, not rerun);
  1. the path 3 -> 4a split in two (the clean-latent target with the `snr` weighting, i.e. stage 3's loss with
     another output; then 4a as it is) and 4b with epsilon prediction (the unscaled schedule alone);
  2. 4e plus one of stage 3's properties at a time: epsilon in the latent under the unscaled schedule, the `snr` and
     `min_snr` weightings, a variance-preserving schedule;
  3. the noise range (sigma_max 1 and 3) of the best pixel-input variant, `--best` (default 4e; choose it from cells
     0-2), and its read-outs (feature_input pca / noisy, feature_timestep 100 / 250: probes of its seed-0 checkpoint);
  4. 8 epochs (4 x 3,099 steps, cosine over all of them) of stage 3, 4e and the best variant if it differs;
  5. the recipe users get (`configs/pretrain/ldae-cifar10-recipe.yaml`, stage 3) run from that file itself on two
     fresh seeds (2 and 3).
Seeds 0 and 1 of every run of cells 0-4; the order is seed 0 of cells 0-2, then their seed 1, then the recipe's
seeds, then cell 3 (seed 0, seed 1), then cell 4 (seed 0 of each, then seed 1): `--hours` drops from the end. Two
runs side by side, one thread each; resumable (run the same command again: DAE runs continue from their latest
checkpoint, probes are cached in `<out>/results.json`). `docs/results/cifar10-attribution.md` is written from what
exists; a hand-written reading below its marker line survives. Every figure and health row is also kept beside the
report, in `cifar10-attribution/record.json`, and read back from there for runs whose output folder is gone (a new
machine), so the page can be rewritten and the study continued without rerunning what it already measured.
Before anything runs, every job's config is built here, so a key this checkout's
`LDAEConfig` does not know (which `PretrainedConfig` would silently keep as an unused attribute) or an invalid
combination stops the study at once instead of hours in.
"""

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cifar10_journey as journey
import reproduce_cifar10 as study
from cifar10_journey import (
    Job,
    SmokeStudy,
    seeds_cell,
    select,
    show_plan,
    smoke_flags,
    summary,
    write_keeping_reading,
)
from reproduce_cifar10 import REPO, Study, Variant, health_table, ldae_encoder, run_health

from modeling_ldae import JOURNEY_STAGES, LDAEConfig

DIM = journey.SEQUENCE_DIM
EPOCH_STEPS = journey.DAE_STEPS  # "2 epochs" below: the journey's 3,099 steps of batch 32 (99,168 images)
LONG_FACTOR = 4  # the 8-epoch runs: 4 x 3,099 steps
SIGMA_MIN = 0.032  # stage 3's smallest sigma / gamma: sqrt(1 / 1000) / sqrt(1 - 1 / 1000) = 0.0316
FIXED_INIT = {"adaln_init": "zero"}  # the default, named so that a checkout without the fixed init refuses to run
NOISE_RANGE = (1.0, 3.0)  # sigma_max of cell 3, around l-DAE's sqrt(2)
CONFIG_DEFAULTS = {name: p.default for name, p in inspect.signature(LDAEConfig.__init__).parameters.items()}
READ_OUTS = {"feature_input=pca": {"feature_input": "pca"}, "feature_input=noisy": {"feature_input": "noisy"},
             "feature_timestep=100": {"feature_timestep": 100}, "feature_timestep=250": {"feature_timestep": 250}}


@dataclass(frozen=True)
class Arm:
    """One trained variant: a journey stage plus config overrides, compared with `against`."""
    name: str
    cell: int
    stage: str
    overrides: dict = field(default_factory=dict)
    change: str = ""
    against: str | None = None  # the arm (or journey figure) it is compared with

    def setting(self, key: str):
        return {**JOURNEY_STAGES[self.stage], **self.overrides}.get(key, CONFIG_DEFAULTS[key])

    @property
    def pixel_input(self) -> bool:
        return self.setting("denoiser_input") == "pixels"

    @property
    def variance_preserving(self) -> bool:
        return self.setting("noise_schedule") != "linear_sigma"


ARMS = (
    Arm("3-patch-pca", 0, "3-patch-pca", change="stage 3: eps on the patch-PCA latent, linear gamma^2",
        against="3-patch-pca (xavier)"),
    Arm("4e", 0, "4e", change="l-DAE", against="4e (xavier)"),
    Arm("4a-snr", 1, "4a", {"loss_weighting": "snr"}, "clean-latent target, SNR weight (stage 3's loss)",
        "3-patch-pca"),
    Arm("4a", 1, "4a", change="clean-latent target, lambda = gamma^2", against="4a-snr"),
    Arm("4b-eps", 1, "4b", {"prediction_type": "epsilon", "sigma_min": SIGMA_MIN},
        "stage 3 under the unscaled schedule (z0 + sigma eps, sigma from 0.032 to sqrt 2)", "3-patch-pca"),
    Arm("4e-latent-eps", 2, "4e", {"denoiser_output": "latent", "prediction_type": "epsilon", "sigma_min": SIGMA_MIN},
        "4e predicting eps in the latent (sigma_min 0.032)", "4e"),
    Arm("4e-snr", 2, "4e", {"loss_weighting": "snr", "sigma_min": SIGMA_MIN}, "4e with the SNR weighting", "4e"),
    Arm("4e-min-snr", 2, "4e", {"loss_weighting": "min_snr", "sigma_min": SIGMA_MIN},
        "4e with min-SNR-5 weighting", "4e"),
    Arm("4e-vp", 2, "4e", {"noise_schedule": "linear_gamma_squared"},
        "4e under linear gamma^2 (variance-preserving)", "4e"),
)
ARM = {arm.name: arm for arm in ARMS}
BEST_CHOICES = [arm.name for arm in ARMS if arm.cell in (0, 2) and arm.pixel_input]
# The journey's runs of these stages (docs/results/cifar10-journey.md, section 1, d = 8, seeds 0 and 1): trained from
# the old, effective xavier init of adaLN and the final layer (issue 19, section 0), in this regime. Not rerun.
XAVIER = {"3-patch-pca (xavier)": {"linear": (49.9, 48.5), "knn": (38.6, 38.6)},
          "4a (xavier)": {"linear": (45.2, 44.6), "knn": (32.3, 31.7)},
          "4e (xavier)": {"linear": (43.0, 43.4), "knn": (31.5, 30.9)}}
# MAE (transformers' ViTMAE, same encoder and decoder size) on the same images: 2 epochs from docs/results/cifar10.md
# ("MAE, same images as l-DAE", cosine, one seed); 8 epochs from docs/results/cifar10-curves.md (warm-up then a
# constant lr, one seed).
MAE = {2: {"linear": 45.2, "knn": 36.6}, 8: {"linear": 46.9, "knn": 40.3}}
RECIPE_FILE = REPO / "configs" / "pretrain" / "ldae-cifar10-recipe.yaml"
RECIPE = Arm("recipe", 5, "3-patch-pca", change=f"{RECIPE_FILE.name}, run from the file", against="3-patch-pca")
CONFIRMATION_SEEDS = (2, 3)  # fresh: no study run used them
MINUTES = 8.5  # a 2-epoch run, one thread beside another: the journey's runs took 7.6-8.7 min


@dataclass
class StudyJob(Job):
    arm: Arm | None = None
    seed: int = 0
    epochs: int = 2


def noise_range_arms(best: Arm) -> list[Arm]:
    """Cell 3's trained arms: `best` with sigma_max 1 and 3. A variance-preserving best has no such key (its end
    point is fixed at sigma = 1), so none."""
    if best.variance_preserving:
        return []
    return [Arm(f"{best.name}-sigma-max{value:g}", 3, best.stage, {**best.overrides, "sigma_max": value},
                f"{best.name}, sigma_max {value:g} (from sqrt 2)", best.name) for value in NOISE_RANGE]


def long_arms(best: Arm) -> list[Arm]:
    names = dict.fromkeys(["3-patch-pca", "4e", best.name])
    return [Arm(f"{name}-8ep", 4, ARM[name].stage, ARM[name].overrides, f"{name}, 8 epochs", None) for name in names]


def recipe_command(data: Path, folder: Path, seed: int, smoke: bool) -> list[str]:
    """The recipe file as a user runs it, with the local data, the seed and the study's output conventions."""
    quick = ["--max_steps", "20", "--warmup_steps", "1", "--save_steps", "10", *smoke_flags(True)] if smoke else []
    return [str(RECIPE_FILE), "--dataset_name", str(data), "--output_dir", str(folder), "--seed", str(seed),
            "--dataloader_num_workers", "0", "--report_to", "none", *quick]


def build_jobs(args) -> list[StudyJob]:
    """Every training job in priority order (cells 0-2 seed 0, then seed 1; the recipe; cell 3; cell 4)."""
    best, out, data = ARM[args.best], Path(args.output_dir), Path(args.data_dir)
    first = [arm for arm in ARMS if arm.cell <= 2]
    order = [(arm, seed) for seed in journey.SEEDS for arm in first]
    order += [(RECIPE, seed) for seed in CONFIRMATION_SEEDS]
    order += [(arm, seed) for seed in journey.SEEDS for arm in noise_range_arms(best)]
    order += [(arm, seed) for seed in journey.SEEDS for arm in long_arms(best)]
    jobs = []
    for arm, seed in order:
        epochs = 8 if arm.cell == 4 else 2
        steps = (20 if args.smoke else EPOCH_STEPS) * epochs // 2
        name, folder = f"{arm.name}-seed{seed}", out / "runs" / f"{arm.name}-seed{seed}"
        if arm is RECIPE:
            command = recipe_command(data, folder, seed, args.smoke)
        else:
            variant = Variant(arm.name, "ldae", {"pca_dim": DIM, **FIXED_INIT, **arm.overrides}, seed)  # STUDY_MODEL
            command = [*study.pretrain_command(variant, data, folder, steps, "cpu",
                                               save_steps=10 if args.smoke else journey.SAVE_STEPS),
                       "--journey_stage", arm.stage, *smoke_flags(args.smoke)]
        jobs.append(StudyJob(name, folder, command, MINUTES * epochs / 2, dae=True, max_steps=steps, arm=arm,
                             seed=seed, epochs=epochs))
    return jobs


def check_configs(jobs: list[StudyJob]) -> None:
    """Build every job's config as run_pretrain.py will: an unknown key or an invalid combination ends the study here,
    naming the job, before hours of the ones before it."""
    for job in jobs:
        overrides = {**study.STUDY_MODEL, "pca_dim": DIM, **FIXED_INIT, **job.arm.overrides}
        unknown = sorted(set(overrides) - set(CONFIG_DEFAULTS))
        if unknown:
            raise SystemExit(f"{job.name}: LDAEConfig has no {', '.join(unknown)} (a typo in the study, or a checkout "
                             "older than issue 19's keys adaln_init / sigma_min / loss_weighting): fix the key or update "
                             "the checkout.")
        try:
            LDAEConfig.from_preset("ldae-tiny", journey_stage=job.arm.stage, **overrides)
        except ValueError as error:
            raise SystemExit(f"{job.name}: {error}") from None


def read_out_keys(best: str) -> dict[str, dict]:
    return {f"{best}-seed0@{label}": overrides for label, overrides in READ_OUTS.items()}


def evaluate(lab: Study, jobs: list[StudyJob], args) -> None:
    """Probe every finished run (cached), then the read-outs of the best variant's seed-0 checkpoint."""
    journey.probe_runs(lab, jobs, args)
    folder = lab.results["pretraining"].get(f"{args.best}-seed0", {}).get("path")
    missing = [key for key in read_out_keys(args.best) if key not in lab.results]
    if missing and folder is None:
        print(f"[skip] read-outs of {args.best}-seed0: its figures come from the record and its checkpoint is gone; "
              f"run it again with --only {args.best}-seed0 after deleting it from {lab.results_path}", flush=True)
    elif missing:
        for key, overrides in read_out_keys(args.best).items():
            lab.evaluate(key, lambda o=overrides: ldae_encoder(folder, args.device, **o))


# ---------------------------------------------------------------------------------------------- record

RECORD_NAME = "record.json"


def restore_record(lab: Study, path: Path) -> None:
    """Add to `lab.results` what the committed record has and the output folder lacks (a new machine): each probe's
    figures and each finished run, without a folder. Such a run counts as done (it is not retrained) and its health
    row comes from the record."""
    if not path.exists():
        return
    record = json.loads(path.read_text())
    for key, figures in record["probes"].items():
        lab.results.setdefault(key, figures)
    runs = lab.results.setdefault("pretraining", {})
    for name, run in record["runs"].items():
        runs.setdefault(name, {key: value for key, value in run.items() if key != "health"})


def healths(lab: Study, names: list[str], record: dict) -> dict[str, dict | None]:
    """Each finished run's health: from its folder where it still exists, else from the record."""
    folders = {name: run.get("path") for name, run in lab.results.get("pretraining", {}).items()}
    return {name: (run_health(folders[name]) if folders[name] and Path(folders[name]).exists()
                   else record.get(name, {}).get("health")) for name in names if name in folders}


def write_record(lab: Study, path: Path, health: dict[str, dict | None]) -> None:
    """Every probe's figures and every finished run's wall clock and health, written whole (a temporary file, then
    a rename) so an interrupted write leaves the previous record."""
    runs = lab.results.get("pretraining", {})
    record = {"probes": {key: value for key, value in sorted(lab.results.items()) if key != "pretraining"},
              "runs": {name: {**{key: value for key, value in run.items() if key != "path"},
                              "health": health.get(name)} for name, run in sorted(runs.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------- report


def figures(lab: Study, name: str, metric: str) -> list[float]:
    """The per-seed figures of an arm ('linear' / 'knn'), or of a journey figure under the xavier init."""
    if name in XAVIER:
        return list(XAVIER[name][metric])
    key = {"linear": "linear_probe_top1", "knn": "knn_top1"}[metric]
    return [lab.results[f"{name}-seed{seed}"][key] for seed in (*journey.SEEDS, *CONFIRMATION_SEEDS)
            if f"{name}-seed{seed}" in lab.results]


def move(new: list[float], old: list[float]) -> str:
    """The change of the mean and whether it is real: above twice the larger seed half-spread of the two (the
    journey's bar); with one seed on either side, no verdict."""
    if not new or not old:
        return "—"
    (mean, spread), (old_mean, old_spread) = summary(new), summary(old)
    if min(len(new), len(old)) < 2:
        return f"{mean - old_mean:+.1f} (1 seed)"
    bar = 2 * max(spread, old_spread)
    return f"{mean - old_mean:+.1f} ({'real' if abs(mean - old_mean) > bar else 'not real'}, bar {bar:.1f})"


def plot(lab: Study, names: list[str], cells: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 0.32 * len(names) + 1.4), sharey=True)
    for here, metric, label in zip(axes, ("linear", "knn"), ("linear probe top-1 (%)", "k-NN top-1 (%)")):
        for row, name in enumerate(names):
            values = figures(lab, name, metric)
            color = "tab:gray" if name in XAVIER else "tab:blue"
            here.plot(values, [row] * len(values), ".", color=color, alpha=0.5)
            if values:
                mean, spread = summary(values)
                here.errorbar([mean], [row], xerr=[spread], fmt="o", color=color, capsize=3)
        here.axvline(MAE[2][metric], color="tab:orange", ls="--", label="MAE, same images (1 seed)")
        stage3 = figures(lab, "3-patch-pca", metric)
        if stage3:
            here.axvline(summary(stage3)[0], color="tab:green", ls=":", label="stage 3, fixed init")
        for row in range(1, len(names)):
            if cells[row] != cells[row - 1]:
                here.axhline(row - 0.5, color="black", lw=0.5)
        here.set_xlabel(label)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    handles, labels = axes[1].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=7, loc="lower center", ncol=2)
    figure.suptitle("CIFAR-10, 2 epochs, d = 8: seeds (dots), mean ± half-spread; grey: journey runs (xavier init)",
                    fontsize=9)
    figure.tight_layout(rect=(0, 0.3 / figure.get_figheight(), 1, 1))  # room for the legend below the axes
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def write_report(lab: Study, jobs: list[StudyJob], path: Path, args) -> None:
    results, runs = lab.results, lab.results.get("pretraining", {})
    best = ARM[args.best]
    cell = lambda key, metric="linear_probe_top1": f"{results[key][metric]:.1f}" if key in results else "—"  # noqa: E731
    two_epoch = [arm for arm in ARMS] + noise_range_arms(best)
    stage3 = {metric: figures(lab, "3-patch-pca", metric) for metric in ("linear", "knn")}
    names = [*XAVIER, *(arm.name for arm in two_epoch)]
    folder = path.with_suffix("")
    record_file = folder / RECORD_NAME
    record = json.loads(record_file.read_text())["runs"] if record_file.exists() else {}
    health = healths(lab, [job.name for job in jobs], record)
    write_record(lab, record_file, health)
    sources = sorted({value["source"] for value in results.values() if "source" in value})
    plot(lab, [*names, RECIPE.name], ["ref"] * len(XAVIER) + [str(arm.cell) for arm in two_epoch] + [str(RECIPE.cell)],
         folder / "attribution.png")
    lines = [
        "# Why l-DAE trails its own stage 3 at CIFAR-10 scale: the attribution study", "",
        *([("**Smoke test (`--smoke`): 20 / 40 DAE steps, probes on 2k / 1k images; the numbers mean nothing.**"), ""]
          if args.smoke else []),
        (f"Command: `python benchmarks/cifar10_attribution.py --output_dir <folder> --best {args.best}` (resumable; "
         "`--plan` shows what is done). Regime of [the journey](cifar10-journey.md): d = 8, 32 px, patch 8 "
         f"(D = 192), width 192, 4 + 4 blocks, batch {study.BATCH_SIZE}, base lr {study.BASE_LEARNING_RATE:g}, "
         f"{study.WARMUP_FRACTION:.0%} warm-up, cosine; 2 epochs = {EPOCH_STEPS:,} steps "
         f"({EPOCH_STEPS * study.BATCH_SIZE:,} images), 8 epochs = {LONG_FACTOR * EPOCH_STEPS:,}. Every run is "
         "`run_pretrain.py --journey_stage` with the config keys below, from the fixed init (adaLN-Zero, zero final "
         "layer, normal(0.02) time MLP: `adaln_init=\"zero\"`) unless marked xavier; the xavier rows are the "
         "journey's runs under the old init, copied from its page, not rerun. sigma_min = 0.032 (stage 3's smallest "
         "sigma / gamma) wherever epsilon or an SNR weighting meets the unscaled schedule.  "),
        (f"Probes (every run the same): the cached-feature linear probe (BatchNorm + Linear, LARS, {args.probe_epochs} "
         "epochs) and k-NN top-1 (k = 20) on the full 50k / 10k split, encoder features at t = 10 on the clean input. "
         "Seeds 0 and 1: mean ± half the spread. A move is called real only above twice the larger half-spread of "
         "the two (the bar); a figure from one seed is marked and gets no verdict."
         + ("" if not sources else f" Figures of runs whose folders are gone are read back from [{RECORD_NAME}]"
            f"({folder.name}/{RECORD_NAME}), some with one decimal ({'; '.join(sources)}): a mean or a move there can "
            "differ by 0.1 from one computed before rounding.")), "",
        "## 1. Two epochs, d = 8", "",
        "| cell | variant | what | init | seed 0 | seed 1 | linear probe | k-NN | against | linear: move | "
        "k-NN: move | vs stage 3 (linear / k-NN) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, values in XAVIER.items():
        lines.append(f"| ref | {name} | journey stage {name.split()[0]} | xavier | {values['linear'][0]} | "
                     f"{values['linear'][1]} | {seeds_cell(list(values['linear']))} | "
                     f"{seeds_cell(list(values['knn']))} | — | — | — | — |")
    for arm in two_epoch:
        linear, knn = figures(lab, arm.name, "linear"), figures(lab, arm.name, "knn")
        against = arm.against
        gap = ("—" if arm.name == "3-patch-pca" or not linear or not stage3["linear"] else
               f"{summary(linear)[0] - summary(stage3['linear'])[0]:+.1f} / {summary(knn)[0] - summary(stage3['knn'])[0]:+.1f}")
        lines.append(f"| {arm.cell} | {arm.name} | {arm.change} | fixed | {cell(f'{arm.name}-seed0')} | "
                     f"{cell(f'{arm.name}-seed1')} | {seeds_cell(linear)} | {seeds_cell(knn)} | {against} | "
                     f"{move(linear, figures(lab, against, 'linear'))} | {move(knn, figures(lab, against, 'knn'))} | "
                     f"{gap} |")
    lines += ["", f"MAE on the same 99,168 images (ViTMAE, [cifar10.md](cifar10.md), one seed): {MAE[2]['linear']} / "
              f"{MAE[2]['knn']} k-NN. Config keys of each variant (on top of `--journey_stage` and d = 8): " + "; ".join(
                  f"{arm.name}: `--journey_stage {arm.stage}`"
                  + (f" + `{study.overrides_string(arm.overrides)}`" if arm.overrides else "") for arm in two_epoch)
              + ".", "", f"![attribution]({folder.name}/attribution.png)", ""]
    if best.variance_preserving:
        lines += [f"The best pixel-input variant ({best.name}) is variance-preserving: its schedule ends at sigma = 1 "
                  "and no config key moves that end point, so cell 3 has no noise-range runs.", ""]
    lines += ["## 2. The recipe, confirmed on fresh seeds", "",
              f"`{RECIPE_FILE.relative_to(REPO)}` (stage 3, the settings of the 3-patch-pca rows) run from the file "
              f"itself, seeds {' and '.join(map(str, CONFIRMATION_SEEDS))}, probed as every run here.", "",
              "| runs | seeds | linear probe | k-NN | vs MAE, same images (linear / k-NN) |", "|---|---|---|---|---|"]
    recipe = {metric: figures(lab, RECIPE.name, metric) for metric in ("linear", "knn")}
    seeds_all = {metric: stage3[metric] + recipe[metric] for metric in ("linear", "knn")}
    for label, seeds, values in (("recipe file", CONFIRMATION_SEEDS, recipe), ("3-patch-pca", journey.SEEDS, stage3),
                                 ("both", journey.SEEDS + CONFIRMATION_SEEDS, seeds_all)):
        vs_mae = ("—" if not values["linear"] else f"{summary(values['linear'])[0] - MAE[2]['linear']:+.1f} / "
                  f"{summary(values['knn'])[0] - MAE[2]['knn']:+.1f}")
        lines.append(f"| {label} | {', '.join(map(str, seeds))} | {seeds_cell(values['linear'])} | "
                     f"{seeds_cell(values['knn'])} | {vs_mae} |")
    lines += ["", f"Recipe file against the study's stage-3 runs: linear {move(recipe['linear'], stage3['linear'])}, "
              f"k-NN {move(recipe['knn'], stage3['knn'])}.", "",
              "## 3. Read-outs (seed 0 checkpoints, probes only, one seed each)", "",
              "| variant | read-out | linear probe | k-NN | linear: move from the default (1 seed) |",
              "|---|---|---|---|---|"]
    for name in dict.fromkeys(["4e", best.name]):
        default = f"{name}-seed0"
        lines.append(f"| {name} | default (clean input, t = 10) | {cell(default)} | {cell(default, 'knn_top1')} | — |")
        for key in read_out_keys(name):
            change = (f"{results[key]['linear_probe_top1'] - results[default]['linear_probe_top1']:+.1f}"
                      if key in results and default in results else "—")
            lines.append(f"| {name} | {key.split('@')[1]} | {cell(key)} | {cell(key, 'knn_top1')} | {change} |")
    lines += ["", "## 4. Eight epochs", "",
              f"{LONG_FACTOR * EPOCH_STEPS:,} steps ({LONG_FACTOR * EPOCH_STEPS * study.BATCH_SIZE:,} images), cosine "
              f"over all of them. MAE at 8 epochs ([cifar10-curves.md](cifar10-curves.md), one seed, warm-up then a "
              f"constant lr): {MAE[8]['linear']} / {MAE[8]['knn']} k-NN.", "",
              "| variant | seed 0 | seed 1 | linear probe | k-NN | vs MAE (linear / k-NN) | vs its 2 epochs (linear) |",
              "|---|---|---|---|---|---|---|"]
    for arm in long_arms(best):
        linear, knn = figures(lab, arm.name, "linear"), figures(lab, arm.name, "knn")
        short = arm.name.removesuffix("-8ep")
        vs_mae = "—" if not linear else f"{summary(linear)[0] - MAE[8]['linear']:+.1f} / {summary(knn)[0] - MAE[8]['knn']:+.1f}"
        lines.append(f"| {arm.name} | {cell(f'{arm.name}-seed0')} | {cell(f'{arm.name}-seed1')} | "
                     f"{seeds_cell(linear)} | {seeds_cell(knn)} | {vs_mae} | "
                     f"{move(linear, figures(lab, short, 'linear'))} |")
    three, four = (figures(lab, f"{name}-8ep", "linear") for name in ("3-patch-pca", "4e"))
    lines += ["", f"4e - stage 3 at 8 epochs (linear): {move(four, three)}.", "",
              "## 5. Health: which noise levels each variant learns", "",
              "The last held-out monitor of each run (`run_pretrain.py`, fixed held-out test images and noise, "
              "step 3,000 of 2-epoch runs, 12,000 of 8-epoch runs): the loss divided by the loss of copying the noisy "
              "input, in the run's own target terms, overall and per t (< 1: it denoises at that t; at each t the "
              "ratio does not depend on the loss weighting; a dash where copying is exact, at t = 999 of a "
              "variance-preserving schedule). Runs of the journey under the xavier init were not kept, so they have "
              f"no row. Rows of runs whose folders are gone come from [{RECORD_NAME}]({folder.name}/{RECORD_NAME}).",
              ""]
    arm_order = {name: index for index, name in enumerate(dict.fromkeys(job.arm.name for job in jobs))}
    for number, title in ((0, "the baselines"), (1, "the path 3 -> 4a -> 4b"), (2, "4e plus one of stage 3's properties"),
                          (3, f"the noise range of {best.name}"), (4, "eight epochs"), (5, "the recipe file")):
        cell_health = {job.name: health[job.name] for job in sorted(jobs, key=lambda job: (arm_order[job.arm.name],
                                                                                         job.seed))
                       if job.arm.cell == number and health.get(job.name)}
        if cell_health:
            lines += [f"Cell {number}, {title}:", "", *health_table(cell_health), ""]
    lines += ["## Every job", "", f"Estimated: {MINUTES:g} min per 2-epoch run (two side by side, one thread each), "
              f"{MINUTES * LONG_FACTOR:g} per 8-epoch run.", "",
              *journey.job_table(jobs, results)]
    write_keeping_reading(path, lines)


def main(argv=None):
    parser = journey.study_parser(__doc__, "attribution",
                                  only_help="only the jobs whose names match (fnmatch, e.g. '*-seed0' '4e-*')",
                                  smoke_help="the whole pipeline in minutes: 20 (8 epochs: 40) DAE steps, probes on "
                                             "2k / 1k images for 2 epochs (numbers meaningless)")
    parser.add_argument("--best", default="4e", choices=BEST_CHOICES,
                        help="the best pixel-input variant of cells 0-2: cell 3 varies its noise range and reads it "
                             "out, cell 4 trains it for 8 epochs too")
    args = journey.parse_study_args(parser, argv, "attribution")
    lab = (SmokeStudy if args.smoke else Study)(args)
    restore_record(lab, Path(args.report_file).with_suffix("") / RECORD_NAME)
    jobs = build_jobs(args)
    selected = select(jobs, args.only, set(lab.results.get("pretraining", {})))
    if args.plan:
        show_plan(selected, lab, args.parallel_runs)
        probes = [key for key in read_out_keys(args.best) if key not in lab.results]
        print(f"Read-outs of {args.best}-seed0 (probes only, after it finishes): {len(probes)} of {len(READ_OUTS)} "
              f"to do (~{len(probes) * journey.MINUTES['probe']:.0f} min).")
        return None
    if not args.report:
        check_configs(selected)
    journey.run_study(lab, jobs, selected, args, evaluate, write_report, folders=("runs", "logs", "probes"))


if __name__ == "__main__":
    main()
