"""The scripts' shared edges (`modeling_ldae.cli`): argument files, renamed flags, one reporting path for errors."""

import multiprocessing
import signal
import time
from dataclasses import dataclass, field

import pytest
from transformers import HfArgumentParser

from modeling_ldae.cli import InputError, parse_arguments, report_errors


@dataclass
class Arguments:
    model_name_or_path: str = field(metadata={"help": "required, as in the evaluation scripts"})
    max_steps: int | None = None
    warmup_steps: int | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    streaming: bool = False
    seed: int = 0


def parser():
    return HfArgumentParser(Arguments, prog="script.py")


def test_a_file_gives_required_arguments_converted_and_flags_after_it_override(tmp_path):
    file = tmp_path / "args.yaml"
    file.write_text("model_name_or_path: ckpt\nmax_steps: 10\ncrop_scale: [0.5, 1.0]\nstreaming: true\nseed: 3\n")
    (args,) = parse_arguments(parser(), [str(file), "--seed", "7"])
    assert args.model_name_or_path == "ckpt" and args.max_steps == 10 and args.crop_scale == [0.5, 1.0]
    assert args.streaming is True and args.seed == 7


def test_json_files_work_too_and_null_means_the_default(tmp_path):
    file = tmp_path / "args.json"
    file.write_text('{"model_name_or_path": "ckpt", "max_steps": null, "streaming": false}')
    (args,) = parse_arguments(parser(), [str(file)])
    assert args.model_name_or_path == "ckpt" and args.max_steps is None and args.streaming is False


def test_renamed_flags_still_work_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="--max_train_steps is renamed --max_steps"):
        (args,) = parse_arguments(parser(), ["--model_name_or_path", "m", "--max_train_steps", "5",
                                             "--num_warmup_steps=2"])
    assert args.max_steps == 5 and args.warmup_steps == 2
    file = tmp_path / "old.yaml"
    file.write_text("model_name_or_path: m\nnum_warmup_steps: 4\n")
    with pytest.warns(FutureWarning, match="--num_warmup_steps is renamed --warmup_steps"):
        (args,) = parse_arguments(parser(), [str(file)])
    assert args.warmup_steps == 4


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("model_name_or_path: m\nlearning_rat: 1\n", "unknown argument(s) learning_rat"),
    ("model_name_or_path: [unclosed\n", "is not valid YAML/JSON"),
    ("- a\n- b\n", "holds a list, not a mapping"),
])
def test_bad_argument_files_are_input_errors(tmp_path, content, message):
    file = tmp_path / "args.yaml"
    if content is not None:
        file.write_text(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_arguments(parser(), [str(file)])


def test_input_errors_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info, report_errors("script.py"):
        raise InputError("--max_steps -1: pass\n a positive number.")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "script.py: error: --max_steps -1: pass a positive number.\n"


def _ignore_sigterm_and_wait():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as DataLoader workers do, to outlive a pre-emption checkpoint
    time.sleep(60)


def test_any_other_error_ends_the_process_and_its_workers_with_one_summary_line(capsys):
    worker = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_wait, daemon=True)
    worker.start()
    with pytest.raises(SystemExit) as exit_info, report_errors("script.py"):
        raise RuntimeError("the loop broke")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == "script.py: error: RuntimeError: the loop broke"
    assert not worker.is_alive()  # at interpreter exit, multiprocessing would wait for it forever
