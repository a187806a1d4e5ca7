"""What the three scripts share at their edges: argument files, renamed flags, and one way to report failure.

- `parse_arguments`: flags, optionally after a YAML / JSON file of them. The file becomes `--key value` arguments
  placed before the command line's own, so argparse converts types, checks required arguments, and lets a flag
  override the file (`HfArgumentParser.parse_yaml_file` would bypass all three).
- `progress_bar_disabled`: `--disable_tqdm`, and no bar in a log file.
- `InputError`: bad user input (flags, data, checkpoints). `report_errors` prints it as one line and exits 2, as
  argparse does for a bad flag; any other exception is logged with its traceback, summarised in one line at the
  end, and ends the process with status 1 and no DataLoader worker left behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import yaml
from transformers import HfArgumentParser

logger = logging.getLogger(__name__)

# Old flag -> its name now (one release of grace, with a warning). The new names are those of `TrainingArguments`
# and the `transformers` examples, so the same concept has the same flag in every script.
RENAMED_FLAGS = {
    "max_train_steps": "max_steps",
    "num_warmup_steps": "warmup_steps",
    "num_warmup_epochs": "warmup_epochs",
    "checkpointing_steps": "save_steps",
    "checkpoints_total_limit": "save_total_limit",
    "train_split": "train_split_name",
    "eval_split": "eval_split_name",
    "pca_from": "tokenizer_from",
}


class InputError(ValueError):
    """Bad user input, found before (or instead of) any work: reported as one line naming the flag and the fix."""


def parse_arguments(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    """The parser's dataclasses from `argv` (default: `sys.argv[1:]`), whose first element may be a .yaml / .yml /
    .json file of arguments. Renamed flags are accepted with a warning. Raises `InputError` for a bad file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = file_arguments(Path(argv[0]), parser) + argv[1:]
    try:
        return parser.parse_args_into_dataclasses(args=_renamed(argv, parser))
    except InputError:
        raise
    except ValueError as error:  # a dataclass's __post_init__ refusing the flags, as TrainingArguments does
        raise InputError(" ".join(str(error).split())) from None


def file_arguments(path: Path, parser: HfArgumentParser) -> list[str]:
    """A YAML / JSON mapping of arguments as command-line arguments (`None` values are left to the defaults)."""
    if not path.is_file():
        raise InputError(f"Argument file {path} does not exist: pass a YAML/JSON file of {parser.prog} arguments.")
    try:
        values = yaml.safe_load(path.read_text()) or {}  # YAML reads JSON too
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML/JSON ({' '.join(str(error).split())[:200]}): fix the file.")
    if not isinstance(values, dict):
        raise InputError(f"{path} holds a {type(values).__name__}, not a mapping of argument names to values.")
    known = {action.dest for action in parser._actions} | set(RENAMED_FLAGS)
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{path}: unknown argument(s) {', '.join(unknown)}; see `{parser.prog} --help`.")
    arguments = []
    for key, value in values.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        arguments += [f"--{key}", *(str(item).lower() if isinstance(item, bool) else str(item) for item in items)]
    return arguments


def _renamed(argv: list[str], parser: HfArgumentParser) -> list[str]:
    known = {action.dest for action in parser._actions}
    result = []
    for argument in argv:
        name, sep, value = argument.partition("=")
        old = name.removeprefix("--")
        if name.startswith("--") and old in RENAMED_FLAGS and old not in known and RENAMED_FLAGS[old] in known:
            new = RENAMED_FLAGS[old]
            warnings.warn(f"--{old} is renamed --{new}; the old name will stop working in the next release.",
                          FutureWarning, stacklevel=3)
            argument = f"--{new}{sep}{value}"
        result.append(argument)
    return result


def progress_bar_disabled(disable_tqdm: bool | None, accelerator) -> bool:
    """`disable` for a tqdm bar: `--disable_tqdm` as in `TrainingArguments`; unset, a bar only where tqdm's stream
    (stderr) is a terminal: in a batch job's log a bar is a carriage-return update per step, and the logged lines
    carry the progress there. Only the local main process shows one."""
    if not accelerator.is_local_main_process:
        return True
    return not sys.stderr.isatty() if disable_tqdm is None else disable_tqdm


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def report_errors(prog: str) -> Iterator[None]:
    """The scripts' one reporting path: `InputError` -> `prog: error: ...` (rank 0) and exit 2; any other exception
    -> its traceback in the log, `prog: error: ...` as the last line and exit 1. Either way this process's
    DataLoader workers are ended first: they ignore SIGTERM (so that a pre-emption signal cannot kill them before
    the checkpoint), which would make the interpreter wait for them forever at exit."""
    try:
        yield
    except InputError as error:
        _end_child_processes()
        if is_main_process():
            print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except (SystemExit, KeyboardInterrupt):
        _end_child_processes()
        raise
    except BaseException as error:
        logger.exception("%s failed", prog)
        _end_child_processes()
        summary = " ".join(str(error).split()) or "(no message)"
        print(f"{prog}: error: {type(error).__name__}: {summary[:500]}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _end_child_processes() -> None:
    """Kill this process's DataLoader workers and leave the process group (gloo's threads, left to interpreter exit,
    can abort the process with "terminate called without an active exception" and hide the exit status)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    children = multiprocessing.active_children()
    if children and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler raises when a DataLoader worker dies, which would abort this cleanup half-way.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)
