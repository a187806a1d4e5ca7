"""Checkpoints of a pre-training run, in one place: where a run resumes from, saving, finding, rotating, loading.

A checkpoint is `<output_dir>/checkpoint-<step>/`: Accelerate's `save_state` (weights, optimizer, scheduler, RNG
states of every process) plus the model config, the image processor (so the folder loads with `from_pretrained`)
and `trainer_state.json`. It is written into `.tmp-checkpoint-<step>/` and renamed into place once complete, so a
crash while saving leaves the previous checkpoints intact and no half-written folder is ever taken as the latest.
The finished run's model sits in `output_dir` itself; its `config.json` is written last, so its presence means the
run finished.

Not `transformers.trainer_utils.get_last_checkpoint` (it takes any `checkpoint-<n>` folder, complete or not) and
not Accelerate's `ProjectConfiguration` rotation (it deletes the oldest checkpoint before writing the new one, so at
a limit of 1 a crash while saving would leave none).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open

from .cli import InputError
from .data import make_image_processor

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
FINAL_MODEL_MARKER = "config.json"
# Config keys that do not change what is trained (bookkeeping, or which outputs a backbone returns): a resumed run
# may differ in them.
# `adaln_init` shapes only the weights a run starts from, which resuming replaces: a run saved before the key existed
# (its init was "xavier") resumes under today's default.
IGNORED_CONFIG_KEYS = {"transformers_version", "auto_map", "architectures", "_name_or_path", "dtype", "torch_dtype",
                       "out_features", "out_indices", "stage_names", "_out_features", "_out_indices",
                       "output_hidden_states", "output_attentions", "return_dict", "feature_pyramid_strides",
                       "adaln_init"}


class RunFinished(Exception):
    """`--resume_from_checkpoint latest` on a run whose final model is saved: there is nothing left to do."""


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder; None for any other name (`checkpoint-best`, ...)."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    found = [(checkpoint_step(path), path) for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")]
    return [path for step, path in sorted(found, key=lambda item: item[0] or 0)
            if step is not None and (path / TRAINER_STATE_NAME).is_file()]


def unreadable_file(checkpoint: Path) -> tuple[Path, str] | None:
    """The first file of `checkpoint` that cannot be read and why, or None. Reads what tells a truncated file (the
    usual damage of a crash or a full disk): safetensors headers (which give the file's size), the directory at
    the end of torch's zip archives (`accelerate.save_state`'s .bin / .pkl), and the JSON files; not every tensor."""
    for file in sorted(path for path in checkpoint.rglob("*") if path.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif file.suffix in (".bin", ".pkl", ".pt"):
                zipfile.ZipFile(file).close()
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except (SafetensorError, zipfile.BadZipFile, ValueError, OSError) as error:
            return file, " ".join(str(error).split()) or type(error).__name__
    return None


def find_latest_checkpoint(output_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint whose files are readable; each newer, unreadable one is named in a warning
    and left in place."""
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        damage = unreadable_file(checkpoint)
        if damage is None:
            return checkpoint
        if warn:
            logger.warning("Skipping %s: %s is unreadable (%s). It is left in place; resuming from an older "
                           "checkpoint.", checkpoint, damage[0], damage[1])
    return None


def resume_checkpoint(output_dir: Path, requested: str | None) -> Path | None:
    """The checkpoint a run starts from (None: from scratch), for `--resume_from_checkpoint` None, `latest` or a
    folder. Raises `RunFinished` for `latest` on a finished run, `InputError` where starting would overwrite a
    finished model or another run's checkpoints, or the folder is not a checkpoint."""
    finished = (output_dir / FINAL_MODEL_MARKER).is_file()
    if requested is None:
        if finished or complete_checkpoints(output_dir):
            raise InputError(f"--output_dir {output_dir} already holds checkpoints or a model: pass "
                             "--resume_from_checkpoint latest to continue that run, or choose another --output_dir.")
        return None
    if requested == "latest":
        if finished:
            raise RunFinished(f"The run in {output_dir} is finished: its model is saved there. Training longer is a "
                              f"new run from that model: --model_name_or_path {output_dir} --output_dir <new folder>.")
        return find_latest_checkpoint(output_dir)  # None: nothing saved yet, start from scratch
    path = Path(requested)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise InputError(f"--resume_from_checkpoint {requested}: no complete checkpoint there (no "
                         f"{TRAINER_STATE_NAME}); pass a {CHECKPOINT_PREFIX}<step> folder of this run or 'latest'.")
    if finished:
        raise InputError(f"--output_dir {output_dir} holds the finished model, which resuming would overwrite: "
                         "resume into a new --output_dir.")
    damage = unreadable_file(path)
    if damage is not None:
        alternative = find_latest_checkpoint(path.parent, warn=False)  # skips `path`
        raise InputError(f"--resume_from_checkpoint {requested}: {damage[0]} is unreadable ({damage[1]}); "
                         + (f"the newest readable checkpoint is {alternative}." if alternative else
                            f"{path.parent} holds no readable checkpoint."))
    return path


def comparable_config(config) -> dict[str, Any]:
    """The config as it matters for resuming: every key, with values as JSON has them."""
    values = json.loads(config.to_json_string(use_diff=False))
    return {key: value for key, value in values.items() if key not in IGNORED_CONFIG_KEYS}


def check_resumable(checkpoint: Path, state: dict[str, Any], config, layout: dict[str, int]) -> None:
    """`InputError` unless the checkpoint was written by the same model config and batch layout. A key the saved
    config lacks (written by an older version) compares as the current class's default."""
    saved, current = state["model_config"], comparable_config(config)
    defaults = comparable_config(type(config)()) if hasattr(type(config), "model_type") else {}
    different = sorted(key for key in current
                       if saved.get(key, defaults.get(key, current[key])) != current[key])
    if different:
        raise InputError(f"--resume_from_checkpoint {checkpoint} belongs to another model config (differs in "
                         f"{', '.join(different[:6])}): resume with the same model arguments.")
    changed = {key: (state[key], value) for key, value in layout.items() if state[key] != value}
    if changed:
        described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        raise InputError(f"--resume_from_checkpoint {checkpoint} was written with another batch layout ({described}):"
                         " resume with the same number of processes and batch settings.")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE_NAME).read_text())


def written_by(checkpoint: Path) -> str | None:
    """The launch id (`ownership`) of the launch that wrote `checkpoint`; None if unknown or unreadable."""
    try:
        return read_trainer_state(checkpoint).get("launch_id")
    except (OSError, ValueError):
        return None


def save_checkpoint(accelerator: Accelerator, model, output_dir: Path, step: int, position: tuple[int, int],
                    state: dict[str, Any], total_limit: int | None, image_size: int) -> Path:
    """Write `checkpoint-<step>` (all processes call this; `position` is this process's (epoch, batch in epoch))
    and keep the newest `total_limit` complete checkpoints (None: all). The folder appears only once complete."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists() and written_by(final) == state.get("launch_id"):  # a stop signal right after a scheduled save
        return final
    temporary = output_dir / f"{TEMPORARY_PREFIX}{final.name}"  # the same on every process: all write into it
    positions = gather_object([position])
    if accelerator.is_main_process and temporary.exists():  # left by a crash while saving
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.config.save_pretrained(temporary)
            make_image_processor(image_size).save_pretrained(temporary)
            full_state = {**state, "step": step, "positions": positions,
                          "model_config": comparable_config(unwrapped.config)}
            (temporary / TRAINER_STATE_NAME).write_text(json.dumps(full_state, indent=2))
            if final.exists():  # an unreadable checkpoint that `latest` skipped, or one of an abandoned trajectory
                kept = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                final.rename(kept)
                logger.warning("%s was not written by this launch: kept as %s, and written anew.", final, kept)
            temporary.rename(final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, total_limit)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Delete all but the newest `total_limit` complete checkpoints; other folders are never touched."""
    if total_limit is None:
        return
    for old in complete_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(old)


def resume(state, checkpoint: Path) -> None:
    """Restore weights, optimizer, scheduler and every process's RNG states from `checkpoint` into the prepared
    objects of `state.accelerator`, and the loop's position into `state` (a `monitors.LoopState`)."""
    state.accelerator.load_state(str(checkpoint))
    saved = read_trainer_state(checkpoint)
    state.step, state.last_loss, state.last_checkpoint = saved["step"], saved["last_loss"], checkpoint
    state.epoch, state.batch_in_epoch = saved["positions"][state.accelerator.process_index]
    logger.info("Resumed from %s at step %d (epoch %d, batch %d).", checkpoint, state.step, state.epoch,
                state.batch_in_epoch)
