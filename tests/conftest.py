"""Session-wide fixtures shared by the whole suite (each torch import costs ~10 s, so share)."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Two busy processes on two cores oversubscribe OpenMP; passive waiting keeps subprocess tests fast.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The local CIFAR-10 copy (Hub schema `img`/`label`). CI sets LDAE_REQUIRE_DATA=1: missing data fails there."""
    path = Path(os.environ.get("LDAE_CIFAR10_DIR", REPO_ROOT.parent / "shared" / "datasets" / "cifar10"))
    if not (path / "train-00000-of-00001.parquet").exists():
        message = f"CIFAR-10 parquet files not found in {path} (set LDAE_CIFAR10_DIR)"
        if os.environ.get("LDAE_REQUIRE_DATA"):
            pytest.fail(message)
        pytest.skip(message)
    return path
