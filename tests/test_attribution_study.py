"""`benchmarks/cifar10_attribution.py` (issue 19's study): every cell's runs, with the config keys the issue names, in
priority order and within its budget of runs; every config valid before hours of runs start."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cifar10_attribution as attribution  # noqa: E402
from reproduce_cifar10 import HEALTH_TIMESTEPS, STUDY_MODEL, health_table  # noqa: E402

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
        [f"{name}-seed{seed}" for seed in (0, 1) for name in FIRST_CELLS]
        + [f"4e-sigma-max{value}-seed{seed}" for seed in (0, 1) for value in (1, 3)]
        + [f"{name}-8ep-seed{seed}" for seed in (0, 1) for name in ("3-patch-pca", "4e")])
    assert sum(job.epochs == 2 for job in study) <= 24 and sum(job.epochs == 8 for job in study) <= 6
    for job in study:
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
    table = health_table({"vp": tmp_path / "vp", "unmonitored": tmp_path / "unmonitored"})
    assert table[2:] == ["| vp | 0.500 | 0.50 | 0.90 | 0.50 | 0.25 | 0.20 | — |"]
