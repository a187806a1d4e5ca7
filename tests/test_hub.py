"""Model card, Hub upload (against a recording fake of HfApi) and atomic output folders."""

import inspect
import os
from pathlib import Path

import pytest
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from modeling_ldae import hub


def _write(root: Path, relative: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(relative)


def test_model_card_metadata_round_trips(tmp_path):
    hub.write_model_card(
        tmp_path,
        model_name="ldae-vit-b-cifar10",
        base_model="someone/ldae-vit-b",
        datasets=["uoft-cs/cifar10"],
        pipeline_tag="image-classification",
        tags=["ldae", "vision"],
        description="l-DAE ViT-B fine-tuned on CIFAR-10.",
        training_arguments={"learning_rate": 4e-3, "num_train_epochs": 100, "output_dir": Path("out")},
        results={"top1": 0.91234, "top5": 0.99},
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.base_model == "someone/ldae-vit-b"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.tags == ["ldae", "vision"]
    assert "# ldae-vit-b-cifar10" in card.text
    assert "| top1 | 0.9123 |" in card.text
    assert '"learning_rate": 0.004' in card.text and '"output_dir": "out"' in card.text


def test_model_card_omits_absent_base_model(tmp_path):
    hub.write_model_card(
        tmp_path, model_name="m", pipeline_tag="image-feature-extraction", tags=[], description="",
        training_arguments={}, results={},
    )
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model is None and data.datasets is None


class RecordingHfApi:
    """Records calls and the files upload_folder would send, applying its patterns as huggingface_hub does.

    Arguments are bound against the real HfApi signatures, so a call the real client would reject fails here too.
    """

    calls: list[tuple[str, dict]] = []

    def __init__(self, token: str | None = None) -> None:
        inspect.signature(HfApi).bind(token=token)
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs) -> RepoUrl:
        inspect.signature(HfApi.create_repo).bind(self, repo_id, **kwargs)
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs) -> CommitInfo:
        inspect.signature(HfApi.upload_folder).bind(self, repo_id=repo_id, folder_path=folder_path, **kwargs)
        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        uploaded = list(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                            ignore_patterns=kwargs.get("ignore_patterns")))
        record = {"repo_id": repo_id, "folder_path": folder_path, "files": uploaded}
        self.calls.append(("upload_folder", record | kwargs))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                          commit_description="", oid="0")


def test_push_to_hub_uploads_model_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    model_files = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "logs/metrics.json"]
    for name in model_files + ["checkpoint-500/model.safetensors", "checkpoint-500/optimizer.pt",
                               "runs/checkpoint-1/x", "tmp-checkpoint-7/x", ".final.tmp-1234/config.json"]:
        _write(tmp_path, name)

    info = hub.push_to_hub(tmp_path, "user/ldae", token="tok", private=True, commit_message="msg")

    assert info.commit_url == "https://huggingface.co/user/ldae/commit/0"
    (_, init), (_, create), (_, upload) = RecordingHfApi.calls
    assert init == {"token": "tok"}
    assert create["repo_id"] == "user/ldae" and create["exist_ok"] and create["private"] is True
    assert upload["repo_id"] == "user/ldae" and upload["commit_message"] == "msg"
    assert upload["folder_path"] == tmp_path
    assert upload["files"] == sorted(model_files)


def test_atomic_output_dir_keeps_old_folder_on_error(tmp_path):
    target = tmp_path / "final"
    _write(target, "config.json")
    with pytest.raises(RuntimeError):
        with hub.atomic_output_dir(target) as staging:
            assert staging.parent == tmp_path and staging != target
            _write(staging, "config.json")
            (staging / "config.json").write_text("half")
            raise RuntimeError("crash mid-save")
    assert sorted(os.listdir(tmp_path)) == ["final"]
    assert (target / "config.json").read_text() == "config.json"


def test_atomic_output_dir_replaces_on_success(tmp_path):
    target = tmp_path / "nested" / "final"
    with hub.atomic_output_dir(target) as staging:
        _write(staging, "a.json")
    assert os.listdir(target) == ["a.json"]
    with hub.atomic_output_dir(target) as staging:
        _write(staging, "b.json")
    assert os.listdir(target) == ["b.json"]
    assert os.listdir(target.parent) == ["final"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
