"""One run owns its output folder, from before it writes anything until it exits, however it exits.

The output folder is usually on a file system shared by the nodes of a cluster, so ownership is a file in the
folder, `.ldae-owner.json`, not a lock (`flock` / `fcntl` locks are local to one machine on many network file
systems). The file says who owns the folder (host, pid, launch id, when it started) and its last sign of life
(a heartbeat the main process refreshes every `LDAE_OWNER_TIMEOUT / 8` seconds from a background thread):

- created with `os.link` from a complete temporary file: exclusive (it fails if the file exists) and atomic on
  local and network file systems (the lock-file recipe of NFS), and the file never exists half-written (where a
  file system has no hard links, `O_CREAT | O_EXCL`, and a reader takes the file being written for a live owner);
- refreshed with `os.replace` of a complete temporary file, after checking it is still this launch's;
- deleted when the run exits (normally, on an error, on SIGTERM / SIGINT: a SIGTERM outside the training loop ends
  the run through `SystemExit` so that the file is released).

A launch that finds the file reads it: an owner on the same host whose process is gone (kill -9, a reboot), or
whose heartbeat is older than `LDAE_OWNER_TIMEOUT` seconds (default 120; a node lost), is dead and the folder is
taken over with a warning; a live owner ends the launch with one line (exit 2) naming it. An owner that received
SIGTERM and is writing its last checkpoint marks itself `draining`; a `--resume_from_checkpoint latest` launch
waits for it (up to `LDAE_DRAIN_TIMEOUT` seconds, default 300) and then resumes from what it saved. By hand:
delete the file, or launch once with `LDAE_TAKE_OVER=1`.

Only the main process owns; every process of the run agrees with its verdict (a broadcast), so all of one
multi-process run are one owner. `check_one_job` refuses processes that were launched as N but do not form one
process group (each would be a separate copy of the run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .cli import InputError

logger = logging.getLogger(__name__)

OWNER_FILE = ".ldae-owner.json"
# Launchers' "how many processes" variables: torchrun / accelerate, Open MPI, MPICH / Intel MPI, MVAPICH.
LAUNCH_SIZE_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def owner_timeout() -> float:
    """Seconds without a heartbeat after which an owner counts as dead (default 120)."""
    return float(os.environ.get("LDAE_OWNER_TIMEOUT", 120))


def drain_timeout() -> float:
    """Seconds a `resume latest` launch waits for a draining owner to save its last checkpoint (default 300: longer
    than the usual SIGTERM grace periods, shorter than NCCL's 10-minute timeout, which the other processes of the
    new launch wait under meanwhile)."""
    return float(os.environ.get("LDAE_DRAIN_TIMEOUT", 300))


def check_one_job(num_processes: int, prog: str) -> None:
    """`InputError` when the launcher started more processes than joined the process group: each would run alone
    as a full copy of the run, all writing the same output folder."""
    launched = {name: int(os.environ[name]) for name in LAUNCH_SIZE_VARIABLES if os.environ.get(name, "").isdigit()}
    name, count = max(launched.items(), key=lambda item: item[1], default=("", 1))
    if count > num_processes:
        raise InputError(
            f"{name}={count}: {count} processes were launched, but Accelerate runs {num_processes} (they did not "
            f"join one process group), so each would be a separate copy of the run writing the same output folder. "
            f"On CPUs launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {count} "
            f"{prog} ...`; on GPUs with `accelerate launch --multi_gpu --num_processes {count} {prog} ...` "
            "(one GPU per process)."
        )


# ---------------------------------------------------------------------------------------------------- the record


def _process_space() -> str | None:
    """Where this process's pids mean something: the kernel's boot id and the pid namespace (Linux). A host name
    alone is not enough: a rebooted node, or two containers given one host name, see other pids."""
    with contextlib.suppress(OSError):
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/{os.readlink('/proc/self/ns/pid')}"
    return None


def _process_start(pid: int) -> str | None:
    """The process's start time since boot (Linux), to tell a reused pid from the owner's."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":  # ended, not yet reaped
            return False
    return start is None or _process_start(pid) in (None, start)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class OwnerRecord:
    """What `.ldae-owner.json` holds."""

    host: str
    pid: int
    launch_id: str
    started: float
    heartbeat: float
    state: str = "running"  # or "draining": after SIGTERM, writing its last checkpoint
    process_space: str | None = None
    process_start: str | None = None
    num_processes: int = 1
    program: str = ""

    @classmethod
    def for_this_process(cls, program: str, num_processes: int) -> OwnerRecord:
        now = time.time()
        return cls(host=socket.gethostname(), pid=os.getpid(), launch_id=uuid.uuid4().hex[:12], started=now,
                   heartbeat=now, process_space=_process_space(), process_start=_process_start(os.getpid()),
                   num_processes=num_processes, program=program)

    @classmethod
    def read(cls, path: Path) -> OwnerRecord | None:
        """The record in `path`; None if there is none (released meanwhile) or it is not a record."""
        try:
            values = json.loads(path.read_text())
            return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):  # not ours, or damaged by hand: stale from its file's age
            with contextlib.suppress(OSError):
                mtime = path.stat().st_mtime
                return cls(host="?", pid=0, launch_id="unreadable", started=mtime, heartbeat=mtime)
            return None

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        return (f"{self.program or 'a run'} pid {self.pid} on {self.host} (launch {self.launch_id}, started "
                f"{_when(self.started)}, last sign of life {age:.0f} s ago)")

    def dead_because(self) -> str | None:
        """Why this owner is dead, or None if it may be alive."""
        if self.host == socket.gethostname() and self.process_space == _process_space():
            if self.pid == os.getpid():
                return "it is this process (an earlier run in it did not release the folder)"
            if not _process_alive(self.pid, self.process_start):
                return f"process {self.pid} no longer exists on this host"
            return None
        age = time.time() - self.heartbeat
        if age > owner_timeout():
            return f"no sign of life for {age:.0f} s (LDAE_OWNER_TIMEOUT={owner_timeout():g})"
        return None


# ---------------------------------------------------------------------------------------------------- ownership


class Ownership:
    """This launch's hold on `output_dir` (only the main process holds the file; other processes' objects are
    inert). `drain()` may be called from a signal handler: it only sets a flag and wakes the heartbeat thread."""

    def __init__(self, output_dir: Path, record: OwnerRecord | None):
        self.path = output_dir / OWNER_FILE
        self.record = record
        self.launch_id = record.launch_id if record else None
        self._wake = threading.Event()
        self._writing = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_temporary(self) -> Path:
        temporary = self.path.with_name(f"{OWNER_FILE}.{self.record.launch_id}.tmp")
        temporary.write_text(json.dumps(asdict(self.record), indent=1))
        return temporary

    def try_create(self) -> bool:
        """Create the file; False if another launch's file is there."""
        temporary = self._write_temporary()
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive creation, then the content
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as file:  # meanwhile a reader finds it new and unreadable: live
                file.write(temporary.read_text())
            return True
        finally:
            temporary.unlink()

    def still_owned(self) -> bool:
        current = OwnerRecord.read(self.path)
        return current is not None and current.launch_id == self.record.launch_id

    def refresh(self) -> None:
        with self._writing:  # one temporary file name: one writer at a time
            if not self.still_owned():
                return
            self.record.heartbeat = time.time()
            os.replace(self._write_temporary(), self.path)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="ldae-owner-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(owner_timeout() / 8)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                if not self.still_owned():
                    logger.error("%s was taken over by another launch: this run no longer owns it.", self.path.parent)
                    return
                self.refresh()
            except OSError as error:  # a file system hiccup: the next beat retries
                logger.warning("Could not refresh %s: %s", self.path, error)

    def drain(self) -> None:
        """Say in the folder that this run stops after its last checkpoint (called on SIGTERM / SIGINT)."""
        if self.record is not None and self.record.state != "draining":
            self.record.state = "draining"
            self._wake.set()

    def ensure_owned(self) -> None:
        """Raise if another launch took the folder over (before committing a checkpoint or the model)."""
        if self.record is not None and not self.still_owned():
            current = OwnerRecord.read(self.path)
            raise RuntimeError(f"{self.path.parent} is now owned by {current.describe() if current else 'nobody'} "
                               f"(its owner file was replaced or deleted): this run stops without writing there.")

    def release(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self.record is not None and self.still_owned():
            self.path.unlink(missing_ok=True)


def _acquire(output_dir: Path, program: str, num_processes: int, wait_for_draining: bool) -> Ownership:
    """The main process's side: create the owner file, or take over a dead owner's, waiting for a draining one if
    asked. Raises `InputError` where a live run owns the folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    ownership = Ownership(output_dir, OwnerRecord.for_this_process(program, num_processes))
    force = os.environ.get("LDAE_TAKE_OVER", "").lower() in ("1", "true", "yes")
    waiting_since = None
    while not ownership.try_create():
        owner = OwnerRecord.read(ownership.path)
        if owner is None:  # released meanwhile
            continue
        dead = "LDAE_TAKE_OVER is set" if force else owner.dead_because()
        if dead is not None:
            logger.warning("Taking over %s from %s: %s.", output_dir, owner.describe(), dead)
            ownership.path.unlink(missing_ok=True)
            continue
        if owner.state == "draining" and wait_for_draining:
            if waiting_since is None:
                waiting_since = time.monotonic()
                logger.warning("%s is owned by %s, which is saving its last checkpoint after a stop signal: waiting "
                               "up to %g s (LDAE_DRAIN_TIMEOUT) for it to finish, then resuming from it.",
                               output_dir, owner.describe(), drain_timeout())
            if time.monotonic() - waiting_since < drain_timeout():
                time.sleep(1)
                continue
            raise InputError(f"{output_dir} is still owned by {owner.describe()}, which has been saving its last "
                             f"checkpoint for over {drain_timeout():g} s (LDAE_DRAIN_TIMEOUT): launch again later.")
        raise InputError(
            f"{output_dir} is in use by {owner.describe()}{', stopping' if owner.state == 'draining' else ''}: wait "
            f"for it to end or use another --output_dir. If that run is dead, delete {ownership.path} or launch "
            "with LDAE_TAKE_OVER=1 (a dead owner on another node is taken over automatically after "
            f"{owner_timeout():g} s without a heartbeat)."
        )
    ownership.start_heartbeat()
    return ownership


@contextlib.contextmanager
def own_output_dir(output_dir: str | Path, program: str, wait_for_draining: bool = False) -> Iterator[Ownership]:
    """Hold `output_dir` for the block: every process of the run enters it or raises the same `InputError`.
    SIGTERM, where it would kill the process (its default handler), ends it through `SystemExit` instead, so that
    the folder is released."""
    state = PartialState()
    ownership, refusal = Ownership(Path(output_dir), None), None
    if state.is_main_process:
        try:
            ownership = _acquire(Path(output_dir), program, state.num_processes, wait_for_draining)
        except InputError as error:
            refusal = str(error)
    launch_id = ownership.launch_id
    if state.num_processes > 1:
        refusal, launch_id = broadcast_object_list([refusal, launch_id])
    if refusal is not None:
        raise InputError(refusal)
    ownership.launch_id = launch_id  # every process labels what it writes
    restore = _exit_on_sigterm()
    try:
        yield ownership
    finally:
        restore()
        ownership.release()


def _exit_on_sigterm() -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)
