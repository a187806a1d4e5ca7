"""`benchmarks/cifar10_attribution.py` (issue 19's study): every cell's runs, with the config keys the issue names, in
priority order and within its budget of runs; every config valid before hours of runs start."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cifar10_attribution as attribution  # noqa: E402
import run_pretrain  # noqa: E402
from cifar10_journey import select  # noqa: E402
from reproduce_cifar10 import HEALTH_TIMESTEPS, STUDY_MODEL, Study, health_table, run_health  # noqa: E402

from modeling_ldae.pretraining import parse_config_overrides  # noqa: E402

FIRST_CELLS = ["3-patch-pca", "4e", "4a-snr", "4a", "4b-eps", "4e-latent-eps", "4e-snr", "4e-min-snr", "4e-vp"]
EPS = {"prediction_type": "epsilon", "sigma_min": 0.032}
EXPECTED = {  # stage and the config keys on top of it (besides d = 8 and the fixed init), as issue 19 lists them
    "3-patch-pca": ("3-patch-pca", {}), "4e": ("4e", {}), "4a-snr": ("4a", {"loss_weighting": "snr"}),
    "4a": ("4a", {}), "4b-eps": ("4b", EPS), "4e-latent-eps": ("4e", {"denoiser_output": "latent", **EPS}),
    "4e-snr": ("4e", {"loss_weighting": "snr", "sigma_min": 0.032}),
    "4e-min-snr": ("4e", {"loss_weighting": "min_snr", "sigma_min": 0.032}),
    "4e-vp": ("4e", {"noise_schedule": "linear_gamma_squared"}),
}


def jobs(best: str = "4e"):
    return attribution.build_jobs(Namespace(best=best, output_dir="out", data_dir="data", smoke=False))


def flags(job) -> tuple[str, dict, int]:
    value = lambda flag: job.command[job.command.index(flag) + 1]  # noqa: E731
    return value("--journey_stage"), parse_config_overrides(value("--config_overrides")), int(value("--max_steps"))


def test_every_cell_in_priority_order_with_the_issues_config_keys():
    study = jobs()
    assert [job.name for job in study] == (
        [f"{name}-seed{seed}" for seed in (0, 1) for name in FIRST_CELLS] + ["recipe-seed2", "recipe-seed3"]
        + [f"4e-sigma-max{value}-seed{seed}" for seed in (0, 1) for value in (1, 3)]
        + [f"{name}-8ep-seed{seed}" for seed in (0, 1) for name in ("3-patch-pca", "4e")])
    assert sum(job.epochs == 2 for job in study) <= 24 and sum(job.epochs == 8 for job in study) <= 6
    for job in study:
        if job.arm is attribution.RECIPE:
            continue  # the recipe file's own flags: the next test
        stage, overrides, steps = flags(job)
        name = job.arm.name.removesuffix("-8ep")
        if "sigma-max" in name:
            expected_stage, keys = "4e", {"sigma_max": float(name.rsplit("max", 1)[1])}
        else:
            expected_stage, keys = EXPECTED[name]
        assert stage == expected_stage and overrides == {**STUDY_MODEL, "pca_dim": 8, "adaln_init": "zero", **keys}
        assert steps == 3099 * job.epochs // 2 and f"--seed {job.seed}" in " ".join(job.command)


def test_the_best_variant_carries_its_keys_into_the_noise_range_and_the_eight_epoch_runs():
    study = {job.name: job for job in jobs("4e-snr")}
    assert flags(study["4e-snr-sigma-max3-seed1"])[1] == {**STUDY_MODEL, "pca_dim": 8, "adaln_init": "zero",
                                                        "loss_weighting": "snr", "sigma_min": 0.032, "sigma_max": 3.0}
    assert [name for name in study if name.endswith("8ep-seed0")] == ["3-patch-pca-8ep-seed0", "4e-8ep-seed0",
                                                                      "4e-snr-8ep-seed0"]
    # A variance-preserving best has no sigma_max to vary: no noise-range runs, the 6 eight-epoch runs remain.
    variance_preserving = [job.name for job in jobs("4e-vp")]
    assert not any("sigma-max" in name for name in variance_preserving)
    assert sum(name.endswith(("8ep-seed0", "8ep-seed1")) for name in variance_preserving) == 6
    assert "3-patch-pca" not in attribution.BEST_CHOICES and "4a" not in attribution.BEST_CHOICES  # pixel input only


def test_the_recipe_jobs_run_the_recipe_file_with_the_settings_of_the_stage_3_runs():
    # The confirmation is of the file users run; it only confirms the study's figures if the file holds the study's
    # stage-3 settings (a drift in either would make the two disagree silently).
    study = {job.name: job for job in jobs()}
    recipe, stage3 = study["recipe-seed2"], study["3-patch-pca-seed0"]
    assert recipe.command[0] == str(attribution.RECIPE_FILE) and recipe.epochs == 2
    model_recipe, data_recipe, args_recipe = run_pretrain.parse_args(recipe.command)
    model_study, data_study, args_study = run_pretrain.parse_args(stage3.command)
    assert args_recipe.seed == 2 and args_recipe.output_dir == "out/runs/recipe-seed2"
    assert model_recipe.journey_stage == model_study.journey_stage == "3-patch-pca"
    assert model_recipe.model_preset == model_study.model_preset
    assert (parse_config_overrides(model_recipe.config_overrides)
            == parse_config_overrides(model_study.config_overrides))
    assert data_recipe.dataset_name == data_study.dataset_name == "data"
    for name in ("per_device_train_batch_size", "base_learning_rate", "max_steps", "warmup_steps", "lr_scheduler_type",
                 "weight_decay", "random_resized_crop", "pca_num_images", "monitor_steps"):
        assert getattr(args_recipe, name) == getattr(args_study, name), name


def test_every_config_is_valid_before_anything_runs():
    attribution.check_configs(jobs())  # issue 19's keys exist and every combination passes LDAEConfig's checks
    bad = jobs()[:1]
    bad[0].arm = attribution.Arm("typo", 0, "4e", {"los_weighting": "snr"})
    with pytest.raises(SystemExit, match="3-patch-pca-seed0: LDAEConfig has no los_weighting"):
        attribution.check_configs(bad)
    bad[0].arm = attribution.Arm("4e-eps", 2, "4e", {"denoiser_output": "latent", "prediction_type": "epsilon"})
    with pytest.raises(SystemExit, match="3-patch-pca-seed0: .*sigma_min"):  # epsilon under linear_sigma needs it
        attribution.check_configs(bad)


def test_health_table_leaves_undefined_ratios_blank_where_copying_is_exact(tmp_path):
    # A variance-preserving run's last monitor: at t = 999 the input is pure noise, so an epsilon model's copy is
    # exact (copy loss 0); the report showed a ZeroDivisionError instead of the table.
    record = {"step": 3000, "monitor/loss": 0.5, "monitor/copy_loss": 1.0}
    for t, (loss, copy) in zip(HEALTH_TIMESTEPS, ((0.9, 1.0), (0.6, 1.2), (0.5, 2.0), (0.4, 2.0), (0.1, 0.0))):
        record |= {f"monitor/loss_t{t}": loss, f"monitor/copy_loss_t{t}": copy}
    (tmp_path / "vp" / "logs").mkdir(parents=True)
    (tmp_path / "vp" / "logs" / "metrics.jsonl").write_text(json.dumps({"step": 10, "train/loss": 1.0}) + "\n"
                                                           + json.dumps(record) + "\n")
    (tmp_path / "unmonitored" / "logs").mkdir(parents=True)
    table = health_table({"vp": run_health(tmp_path / "vp"), "unmonitored": run_health(tmp_path / "unmonitored")})
    assert table[2:] == ["| vp | 0.500 | 0.50 | 0.90 | 0.50 | 0.25 | 0.20 | — |"]


def test_a_new_machine_continues_the_study_from_the_record_without_rerunning_or_losing_rows(tmp_path):
    # The study's output folder lives outside the work tree and went with the machine: the committed record must let
    # the report be rewritten with every figure and health row, and keep finished runs from being trained again.
    report = tmp_path / "docs" / "cifar10-attribution.md"
    health = {"step": 3000, "loss": 1.457, "ratio": 0.49,
              "ratio_t": {"10": 0.91, "250": 0.8, "500": 0.58, "750": 0.46, "999": None}}
    record = {"probes": {"4e-seed0": {"linear_probe_top1": 41.2, "linear_probe_train_top1": 41.9, "knn_top1": 31.7,
                                      "source": "the page before"},
                         "recipe-seed3": {"linear_probe_top1": 48.9, "linear_probe_train_top1": 50.5,
                                          "knn_top1": 39.8}},
              "runs": {"4e-seed0": {"wall_seconds": 1320, "resumed": False, "source": "the page before",
                                    "health": health}}}
    (report.parent / "cifar10-attribution").mkdir(parents=True)
    (report.parent / "cifar10-attribution" / "record.json").write_text(json.dumps(record))
    report.write_text("old\n<!-- reading: written by hand below this line, kept when the report is regenerated -->"
                      "\nThe reading.\n")
    args = Namespace(best="4e", output_dir=str(tmp_path / "new-machine"), data_dir="data", smoke=False,
                     report_file=str(report), probe_epochs=90, device="cpu")
    lab = Study(args)
    attribution.restore_record(lab, report.with_suffix("") / "record.json")
    study = attribution.build_jobs(args)
    assert [job.name for job in select(study, ["4e-seed*"], set(lab.results["pretraining"]))] == ["4e-seed0",
                                                                                                  "4e-seed1"]
    assert "4e-seed0" in lab.results["pretraining"] and "4e-seed1" not in lab.results["pretraining"]  # not retrained
    attribution.evaluate(lab, [job for job in study if job.name == "4e-seed0"], args)  # no checkpoint: read-outs skip
    attribution.write_report(lab, study, report, args)
    page = report.read_text()
    assert "| 4e-seed0 | 1.457 | 0.49 | 0.91 | 0.80 | 0.58 | 0.46 | — |" in page
    assert "| 0 | 4e | l-DAE | fixed | 41.2 | — | 41.2 (1 seed) | 31.7 (1 seed) |" in page and "(the page before)" in page
    assert "| recipe file | 2, 3 | 48.9 (1 seed) | 39.8 (1 seed) | +3.7 / +3.2 |" in page  # its fresh seeds count
    assert page.endswith("The reading.\n")
    assert json.loads((report.parent / "cifar10-attribution" / "record.json").read_text()) == record
