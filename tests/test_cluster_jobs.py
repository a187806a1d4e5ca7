"""Runs as a pre-emptible cluster runs them. One run owns its output folder (`modeling_ldae.ownership`): real
concurrent launches, kill -9 and SIGTERM on real `run_pretrain.py` processes (CIFAR-10, `ldae-tiny`), owners on
other hosts as their owner file records them, launches whose processes do not form one job. Then a damaged
checkpoint, and progress bars in a batch job's log."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import ANY

import pytest

import run_linear_probe
import run_pretrain
from conftest import reset_accelerate_state, write_cifar_subset

OWNER_FILE = ".ldae-owner.json"  # what the folder records: read here as a user would
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model_preset", "ldae-tiny", "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0",
    "--base_learning_rate", "2e-3", "--warmup_steps", "2", "--logging_steps", "2", "--monitor_steps", "0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}

# A real run that pauses after optimizer step PAUSE_AT (after that step's checkpoint) until the test lets it go on.
PAUSING_RUN = """
import sys, time
from pathlib import Path
from unittest.mock import ANY
sys.path.insert(0, {repo!r})
import run_pretrain
from modeling_ldae.monitors import TrainingHook

class Pause(TrainingHook):
    def on_step(self, state):
        if state.step == {step}:
            Path({paused!r}).touch()
            while not Path({go!r}).exists():
                time.sleep(0.05)
        return {{}}

run_pretrain.main(sys.argv[1:], hooks=[Pause()])
"""

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory, cifar10_dir) -> Path:
    return write_cifar_subset(cifar10_dir, tmp_path_factory.mktemp("cifar_subset"), num_train=64, num_eval=16)


@pytest.fixture
def arguments(tmp_path, cifar_subset, tiny_checkpoint):
    """The run's flags (4 steps an epoch), its output folder and a function starting it as a pausing process."""
    out = tmp_path / "out"
    argv = [*TINY, "--train_dir", cifar_subset, "--tokenizer_from", tiny_checkpoint, "--output_dir", out]

    def start_pausing(pause_at: int, *extra) -> tuple[subprocess.Popen, Path]:
        paused, go = tmp_path / "paused", tmp_path / "go"
        script = tmp_path / "pausing_run.py"
        script.write_text(PAUSING_RUN.format(repo=str(REPO_ROOT), step=pause_at, paused=str(paused), go=str(go)))
        process = subprocess.Popen([sys.executable, str(script), *map(str, [*argv, *extra])], env=ENV, cwd=REPO_ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        return process, go

    return argv, out, start_pausing


def run(argv):
    return run_pretrain.main([str(a) for a in argv])


def launch_ids(out: Path) -> dict[str, str]:
    return {p.name: json.loads((p / "trainer_state.json").read_text())["launch_id"]
            for p in sorted(out.glob("checkpoint-*")) if p.name.removeprefix("checkpoint-").isdigit()}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_second_launch_into_a_live_run_exits_2_at_once_and_writes_nothing(arguments, capsys):
    argv, out, start_pausing = arguments
    first, go = start_pausing(2, "--max_steps", 6, "--save_steps", 2)
    try:
        owner = json.loads((out / OWNER_FILE).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        before = snapshot(out)
        # The pre-emptible pattern (`latest`), then a fresh run with another seed: both refused, neither writes.
        for extra in (["--resume_from_checkpoint", "latest"], ["--seed", 1]):
            started = time.monotonic()
            with pytest.raises(SystemExit) as refused:
                run([*argv, "--max_steps", 6, "--save_steps", 2, *extra])
            assert refused.value.code == 2 and time.monotonic() - started < 10
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"run_pretrain.py: error: {out} is in use by run_pretrain.py pid {first.pid} on "
                                   f"{socket.gethostname()}")
            assert "last sign of life" in line and OWNER_FILE in line
            assert snapshot(out) == before
            reset_accelerate_state()
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    assert set(launch_ids(out)) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert set(launch_ids(out).values()) == {owner["launch_id"]}  # every checkpoint is the first run's
    assert not (out / OWNER_FILE).exists()  # released at the end


def test_a_run_killed_with_9_is_taken_over_by_the_next_resume_latest(arguments, caplog):
    argv, out, start_pausing = arguments
    caplog.set_level(logging.INFO)
    killed, _ = start_pausing(4, "--max_steps", 8, "--save_steps", 4)
    killed.kill()
    killed.communicate()
    left = json.loads((out / OWNER_FILE).read_text())
    assert left["pid"] == killed.pid  # nothing could release it

    progress = run([*argv, "--max_steps", 8, "--save_steps", 4, "--resume_from_checkpoint", "latest"])
    assert progress.step == 8
    assert f"Taking over {out} from run_pretrain.py pid {killed.pid}" in caplog.text
    assert f"process {killed.pid} no longer exists on this host" in caplog.text
    assert f"Resumed from {out / 'checkpoint-4'} at step 4" in caplog.text
    ids = launch_ids(out)
    assert ids["checkpoint-4"] == left["launch_id"] != ids["checkpoint-8"]
    assert (out / "config.json").exists() and not (out / OWNER_FILE).exists()


def test_a_requeued_launch_waits_for_the_sigtermed_owner_then_resumes_from_its_checkpoint(arguments, caplog):
    argv, out, start_pausing = arguments
    caplog.set_level(logging.INFO)
    stopping, go = start_pausing(3, "--max_steps", 8, "--save_steps", 4)
    stopping.send_signal(signal.SIGTERM)  # the scheduler pre-empts it, and requeues the job at once
    deadline = time.monotonic() + 30
    while json.loads((out / OWNER_FILE).read_text())["state"] != "draining":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    threading.Timer(2, go.touch).start()  # it goes on to its stop step, checkpoints and exits
    progress = run([*argv, "--max_steps", 8, "--save_steps", 4, "--resume_from_checkpoint", "latest"])
    _, stderr = stopping.communicate(timeout=60)
    assert stopping.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "which is saving its last checkpoint after a stop signal: waiting up to 300 s" in caplog.text
    # The processes agree to stop at the step after the signal: step 4, whose checkpoint the new launch resumes.
    assert f"Resumed from {out / 'checkpoint-4'} at step 4" in caplog.text
    assert progress.step == 8 and (out / "config.json").exists()


def _record(**values) -> dict:
    now = time.time()
    return {"host": "node-b", "pid": 4242, "launch_id": "0123456789ab", "started": now - 600, "heartbeat": now,
            "state": "running", "program": "run_pretrain.py", **values}


# The owner file's fields besides a fresh heartbeat: the record is built when the test runs, not when it is collected
# (a suite slower than LDAE_OWNER_TIMEOUT before this test would otherwise find the "live" owner stale).
@pytest.mark.parametrize("fields, env, refusal", [
    ({}, {}, "is in use by run_pretrain.py pid 4242 on node-b (launch 0123456789ab"),
    ({"state": "draining"}, {"LDAE_DRAIN_TIMEOUT": "1"},
     "is still owned by run_pretrain.py pid 4242 on node-b (launch 0123456789ab"),
    ({"heartbeat_age": 3600}, {}, None),  # its node was lost an hour ago
    ({}, {"LDAE_TAKE_OVER": "1"}, None),  # the override by hand
], ids=["live", "draining-too-long", "stale", "take-over"])
def test_an_owner_on_another_host_blocks_while_it_shows_signs_of_life(fields, env, refusal, arguments, monkeypatch,
                                                                     capsys, caplog):
    fields = dict(fields)
    record = _record(heartbeat=time.time() - fields.pop("heartbeat_age", 0), **fields)
    argv, out, _ = arguments
    out.mkdir()
    (out / OWNER_FILE).write_text(json.dumps(record))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [*argv, "--max_steps", 2, "--save_steps", 2, "--resume_from_checkpoint", "latest"]
    if refusal is None:
        assert run(argv).step == 2
        assert f"Taking over {out} from run_pretrain.py pid 4242 on node-b" in caplog.text
        assert not (out / OWNER_FILE).exists() and (out / "config.json").exists()
        return
    with pytest.raises(SystemExit) as refused:
        run(argv)
    assert refused.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"run_pretrain.py: error: {out} {refusal}")
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE]
    assert json.loads((out / OWNER_FILE).read_text()) == record


def test_the_evaluation_scripts_own_their_output_folder_too(tmp_path, cifar_subset, tiny_checkpoint, capsys):
    out = tmp_path / "probe"
    out.mkdir()
    (out / OWNER_FILE).write_text(json.dumps(_record(program="run_linear_probe.py")))
    with pytest.raises(SystemExit) as refused:
        run_linear_probe.main([
            "--model_name_or_path", str(tiny_checkpoint), "--train_dir", str(cifar_subset), "--output_dir", str(out),
            "--do_train", "--max_steps", "1", "--report_to", "none",
        ])
    assert refused.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.startswith(f"run_linear_probe.py: error: {out} is in use by run_linear_probe.py pid 4242 on node-b")
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE]


def test_processes_that_do_not_form_one_job_exit_2_before_writing(tmp_path, cifar_subset, tiny_checkpoint):
    """torchrun without GPUs starts processes that each see one process: two copies of the run."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO_ROOT / "run_pretrain.py"),
         *TINY, "--train_dir", str(cifar_subset), "--tokenizer_from", str(tiny_checkpoint), "--max_steps", "2",
         "--output_dir", str(out)],
        env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("run_pretrain.py: error:")]
    assert len(errors) == 1, result.stderr[-3000:]  # one line, from rank 0
    assert "2 processes were launched, but Accelerate runs 1" in errors[0]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 run_pretrain.py" in errors[0]
    assert "exitcode  : 2" in result.stderr  # torchrun's report of each copy
    assert not out.exists()


def test_ownership_without_hard_links_is_still_exclusive(tmp_path, monkeypatch):
    """Some shared file systems refuse hard links: the owner file is then created with O_CREAT | O_EXCL."""
    from modeling_ldae.cli import InputError
    from modeling_ldae.ownership import own_output_dir

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with own_output_dir(tmp_path / "out", "run_pretrain.py") as owner:
        assert json.loads((tmp_path / "out" / OWNER_FILE).read_text())["launch_id"] == owner.launch_id
        monkeypatch.setenv("LDAE_OWNER_TIMEOUT", "3600")
        record = json.loads((tmp_path / "out" / OWNER_FILE).read_text())
        (tmp_path / "out" / OWNER_FILE).write_text(json.dumps({**record, "host": "node-b", "launch_id": "b"}))
        with pytest.raises(InputError, match="is in use by run_pretrain.py pid"):
            with own_output_dir(tmp_path / "out", "run_pretrain.py"):
                pass
    assert (tmp_path / "out" / OWNER_FILE).exists()  # another launch's file (node-b): never deleted by this one


def test_a_run_whose_folder_was_taken_over_stops_without_writing_there(arguments, capsys):
    argv, out, _ = arguments

    class TakenOverAt:  # another node's launch takes the folder over (LDAE_TAKE_OVER=1, or a stalled heartbeat)
        def on_batch(self, state, batch, outputs, weight):
            pass

        def on_step(self, state):
            if state.step == 3:
                (out / OWNER_FILE).write_text(json.dumps(_record()))
            return {}

    with pytest.raises(SystemExit) as stopped:
        run_pretrain.main([str(a) for a in [*argv, "--max_steps", 6, "--save_steps", 2]], hooks=[TakenOverAt()])
    assert stopped.value.code == 1
    assert f"{out} is now owned by run_pretrain.py pid 4242 on node-b" in capsys.readouterr().err.splitlines()[-1]
    assert sorted(launch_ids(out)) == ["checkpoint-2"] and not (out / "config.json").exists()
    assert json.loads((out / OWNER_FILE).read_text()) == _record() | {"started": ANY, "heartbeat": ANY}


def test_sigterm_outside_the_loop_ends_the_run_and_releases_the_folder(arguments, monkeypatch):
    """Pre-empted while saving the final model (after the loop's own signal handling): before, the default handler
    killed the process and left the owner file behind."""
    from modeling_ldae import hub

    argv, out, _ = arguments
    monkeypatch.setattr(hub, "write_model_card", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        run([*argv, "--max_steps", 2, "--save_steps", 2])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not (out / OWNER_FILE).exists() and not (out / "config.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

# ---------------------------------------------------------------------------------------------------- damage, logs


class FailAfter:
    """A hook that ends the run with an error after optimizer step `step` (a crash, after that step's checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_batch(self, state, batch, outputs, weight):
        pass

    def on_step(self, state):
        if state.step == self.step:
            raise RuntimeError("node lost")
        return {}


def test_an_unreadable_checkpoint_is_skipped_by_latest_and_named_when_asked_for(arguments, capsys, caplog):
    argv, out, _ = arguments
    argv = [*argv, "--max_steps", 6, "--save_steps", 2]
    with pytest.raises(SystemExit):
        run_pretrain.main([str(a) for a in argv], hooks=[FailAfter(4)])
    damaged = out / "checkpoint-4" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:6])  # truncated, as by a full disk
    reset_accelerate_state()
    capsys.readouterr()

    with pytest.raises(SystemExit) as refused:
        run([*argv, "--resume_from_checkpoint", out / "checkpoint-4"])
    assert refused.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"run_pretrain.py: error: --resume_from_checkpoint {out / 'checkpoint-4'}: {damaged} is unreadable "
                    "(Error while deserializing header: header too small); the newest readable checkpoint is "
                    f"{out / 'checkpoint-2'}.")
    reset_accelerate_state()

    caplog.set_level(logging.INFO)
    assert run([*argv, "--resume_from_checkpoint", "latest"]).step == 6
    assert f"Skipping {out / 'checkpoint-4'}: {damaged} is unreadable" in caplog.text
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    # Nothing deleted: the damaged checkpoint is kept beside the one written anew at step 4.
    (kept,) = out.glob("checkpoint-4.replaced-*")
    assert (kept / "model.safetensors").stat().st_size == 6
    assert sorted(launch_ids(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


@pytest.mark.parametrize("flag, bar_shown", [([], False), (["--disable_tqdm", "false"], True)])
def test_no_progress_bar_in_a_log_file_unless_asked_for(flag, bar_shown, arguments, capsys):
    argv, out, _ = arguments
    run([*argv, "--max_steps", 2, "--save_steps", 0, *flag])  # stderr is captured here: not a terminal
    assert ("pre-training: 100%" in capsys.readouterr().err) == bar_shown


@pytest.mark.parametrize("flag, disabled", [([], True), (["--disable_tqdm", "false"], False)])
def test_the_evaluation_scripts_show_no_bar_in_a_log_file_unless_asked_for(flag, disabled):
    from transformers import HfArgumentParser

    from modeling_ldae.classification import LinearProbeTrainingArguments

    (args,) = HfArgumentParser(LinearProbeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "out", "--report_to", "none", *flag])  # stderr is captured here: not a terminal
    assert args.disable_tqdm is disabled
