"""Model card, Hub upload and crash-safe output folders for trained l-DAE models."""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData

# Trainer checkpoints (optimizer state, RNG) and unfinished `atomic_output_dir` folders are not part of the model.
IGNORE_PATTERNS = ["checkpoint*", "*/checkpoint*", "tmp-checkpoint*", "*.tmp*"]


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    pipeline_tag: str,
    tags: list[str],
    description: str,
    training_arguments: Mapping[str, Any],
    results: Mapping[str, Any],
) -> ModelCard:
    """Write `output_dir/README.md`: Hub metadata, description, results table and training arguments (JSON)."""
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        datasets=datasets,
        tags=list(tags),
    )
    rows = "\n".join(f"| {name} | {_format(value)} |" for name, value in results.items())
    arguments = json.dumps(dict(training_arguments), indent=2, sort_keys=True, default=str)
    card = ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# {model_name}\n\n{description}\n\n"
        f"## Results\n\n| Metric | Value |\n|---|---|\n{rows}\n\n"
        f"## Training arguments\n\n```json\n{arguments}\n```\n"
    )
    card.save(Path(output_dir) / "README.md")
    return card


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload l-DAE model",
) -> CommitInfo:
    """Create the model repo if needed and upload `output_dir` without checkpoints or temporary folders."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=IGNORE_PATTERNS,
    )


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh sibling folder of `path` that replaces `path` only if the block succeeds.

    On an exception the sibling is deleted and an existing `path` is untouched. POSIX cannot rename a folder over a
    non-empty one, so the old folder is first renamed aside: `path` is briefly absent, never half-written.
    Use from one process only (the main process of a distributed run).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0o700 would become the final folder's mode.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        tmp.rename(path)
        return
    old = path.with_name(f".{path.name}.old.tmp-{uuid.uuid4().hex[:8]}")
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old)
