"""Model cards, Hub ids and Hub upload of trained models, shared by the three scripts.

The scripts upload with `push_to_hub` here, not with `Trainer.push_to_hub`, which would regenerate README.md over
the card written by `write_model_card`.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .cli import InputError

# Checkpoints (optimizer state, RNG) and unfinished temporary folders are not part of the model.
IGNORE_PATTERNS = ["checkpoint*", "*/checkpoint*", ".tmp*", "*/.tmp*", ".ldae-owner*"]  # run state


def hub_id(name: str | os.PathLike | None) -> str | None:
    """`name` if it can only be a Hub id (card metadata links Hub models and data sets), None for local paths."""
    if name is None:
        return None
    name = str(name)
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def repo_id(hub_model_id: str | None, output_dir: str | os.PathLike) -> str:
    """The repository to upload to: `--hub_model_id`, else the output folder's name; checked before any training,
    so that a bad id cannot fail the upload after a long run."""
    name = hub_model_id or Path(output_dir).resolve().name
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise InputError(f"--hub_model_id {name!r} is not a valid Hub repository id ({error}): pass "
                         "--hub_model_id <user or organisation>/<name>.") from None
    return name


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
