"""Session-wide fixtures shared by the whole suite (each torch import costs ~10 s, so share)."""

import contextlib
import inspect
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Two busy processes on two cores oversubscribe OpenMP; passive waiting keeps subprocess tests fast.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def reset_accelerate_state() -> None:
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """For modules that run the scripts in-process: `pytestmark = pytest.mark.usefixtures(...)`."""
    yield
    reset_accelerate_state()


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


def read_cifar10_images(cifar10_dir: Path, split: str = "train", count: int = 256, offset: int = 0):
    """`count` real CIFAR-10 images as a float tensor in [-1, 1] (N, 3, 32, 32) and their labels."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    table = pq.read_table(cifar10_dir / f"{split}-00000-of-00001.parquet").slice(offset, count).to_pylist()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB")) for row in table])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, torch.tensor([row["label"] for row in table])


@pytest.fixture(scope="session")
def cifar10_train_images(cifar10_dir):
    return read_cifar10_images(cifar10_dir, "train", 512)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, cifar10_train_images) -> Path:
    """An `ldae-tiny` pre-training checkpoint (random blocks, PCA fitted on 512 real images) + image processor.
    Read-only for tests: copy it before changing it."""
    import torch

    from modeling_ldae import LDAEConfig, LDAEForPreTraining, fit_patch_pca
    from modeling_ldae.data import make_image_processor

    torch.manual_seed(0)
    config = LDAEConfig.from_preset("ldae-tiny")
    model = LDAEForPreTraining(config)
    model.set_pca(*fit_patch_pca(cifar10_train_images[0].split(128), config.patch_size))
    path = tmp_path_factory.mktemp("tiny_checkpoint")
    model.save_pretrained(path)
    make_image_processor(config.image_size).save_pretrained(path)
    return path


def write_cifar_subset(cifar10_dir: Path, folder: Path, num_train: int, num_eval: int) -> Path:
    """The first images of CIFAR-10's train and test splits as one parquet shard each, in the Hub schema
    (img: Image, label: ClassLabel), in `folder`."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_eval)):
        table = pq.read_table(cifar10_dir / f"{split}-00000-of-00001.parquet").slice(0, count)
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    return folder


def check_classifier_card(card_path: Path, results: dict, task_name: str, data: Path) -> None:
    """A probe's or fine-tune's card, loaded as the Hub reads it: Apache-2.0, the paper, usage with remote code, and
    its model-index holding exactly the run's evaluation top-1 / top-5 on the local `data` folder's test split."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    assert card.data.license == "apache-2.0" and "arxiv:2401.14404" in card.data.tags
    assert "trust_remote_code=True" in card.text and "import modeling_ldae" in card.text
    top1, top5 = card.data.eval_results
    for result, k in ((top1, 1), (top5, 5)):
        assert (result.task_type, result.task_name) == ("image-classification", task_name)
        assert (result.dataset_type, result.dataset_name, result.dataset_split) == ("imagefolder", data.name, "test")
        assert result.metric_value == results[f"eval_top{k}"]
        assert result.metric_args == {"num_examples": results["eval_samples"]}
    assert (top1.metric_type, top5.metric_type) == ("accuracy", "top_5_accuracy")


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi` at the network boundary, the suite's one fake Hub client. Every call is
    bound against the real `HfApi` signature (a call the real client would reject fails here too), and
    `upload_folder` records the files the real upload would send: the folder's files after its allow / ignore
    patterns, applied with huggingface_hub's own filter."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token: str | None = None) -> None:
        from huggingface_hub import HfApi

        inspect.signature(HfApi).bind(token=token)
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs):
        from huggingface_hub import HfApi, RepoUrl

        inspect.signature(HfApi.create_repo).bind(self, repo_id, **kwargs)
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        # The Hub puts a bare name in the token owner's namespace.
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'token-owner/' + repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path, **kwargs):
        from huggingface_hub import CommitInfo, HfApi
        from huggingface_hub.utils import filter_repo_objects

        inspect.signature(HfApi.upload_folder).bind(self, repo_id=repo_id, folder_path=folder_path, **kwargs)
        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        uploaded = list(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                            ignore_patterns=kwargs.get("ignore_patterns")))
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, "files": uploaded,
                                             **kwargs}))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                          commit_description="", oid="0")


@contextlib.contextmanager
def recording_hub():
    """Patch `modeling_ldae.hub.HfApi` with `RecordingHfApi` for the block; yields the list of recorded calls."""
    from modeling_ldae import hub

    calls = []
    patch = pytest.MonkeyPatch()
    patch.setattr(RecordingHfApi, "calls", calls)
    patch.setattr(hub, "HfApi", RecordingHfApi)
    try:
        yield calls
    finally:
        patch.undo()


@pytest.fixture
def hub_calls():
    """The calls a test's code makes to the Hub, recorded by `RecordingHfApi` instead of sent."""
    with recording_hub() as calls:
        yield calls
