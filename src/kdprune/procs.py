"""Processes by identity: who owns a run, whether that process still lives, which `dvc` started a stage.

An identity is `host:pid:start`, the start time read from /proc, so a pid reused by a later
process is never mistaken for the one that owned a run. Linux only (/proc); elsewhere nothing
is known and nothing is claimed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
from pathlib import Path
from typing import Iterable, Iterator

STAGE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what ends a stage: DVC's SIGTERM, Ctrl-C, a hang-up


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, or None. A zombie (exited,
    not yet reaped by its parent: a `dvc` killed under a test or a script that has yet to wait for it)
    is not alive."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ... starttime is field 22
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def identity(pid: int | None = None) -> str | None:
    pid = os.getpid() if pid is None else pid
    stat = _stat(pid)
    return None if stat is None else f"{socket.gethostname()}:{pid}:{stat[1]}"


def alive(ident: str) -> bool | None:
    """Whether the process of an identity lives; None when it belongs to another host (we cannot tell)."""
    try:
        host, pid, start = ident.rsplit(":", 2)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    stat = _stat(int(pid))
    return stat is not None and str(stat[1]) == start


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """For a long-lived process's imports (the fork server's torch, the service's MLflow): no cyclic
    garbage collection while they run (importing torch ran five full collections, 0.4-0.5 s of its 2.5-3
    s), and what they made frozen afterwards, out of every later collection's sight in this process and
    in its forks (what Python's gc.freeze is for: a server that forks)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def umask() -> int:
    """This process's umask, read without changing it (another thread may be creating a file meanwhile)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FORKED_FOR = "KDPRUNE_FORKED_FOR"  # in a fork of the fork server: the pid of the process it stands for


def forked() -> bool:
    """Whether this process is a fork of the fork server running a stage (kdprune.forkserver)."""
    return bool(os.environ.get(FORKED_FOR))


def stage_pid() -> int:
    """The process DVC started for this stage: this one, or, in a fork of the fork server, the one that
    handed the stage over, which lives exactly as long as the stage does."""
    return int(os.environ[FORKED_FOR]) if forked() else os.getpid()


def fork_holding(signals: Iterable[int] = STAGE_SIGNALS) -> tuple[int, set[int]]:
    """os.fork() with `signals` blocked across it, so that no handler the child inherits runs there before
    it sets its own. Returns the pid and the mask from before: this process has that mask back on return;
    the child keeps the signals blocked until it restores the mask itself, when any that came arrive."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    pid = -1
    try:
        pid = os.fork()
        return pid, held
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` when our parent dies (PR_SET_PDEATHSIG; Linux only, else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signum)


def dvc_ancestor() -> str | None:
    """The identity of the nearest ancestor process that is DVC (`dvc repro`, `dvc exp run`, a queue's
    `dvc exp exec-run`): the pipeline execution this stage belongs to. None outside DVC."""
    pid = stage_pid() if forked() else os.getppid()
    for _ in range(32):
        if pid <= 1:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:2]) or argv[1:3] == [b"-m", b"dvc"]:
            return identity(pid)
        stat = _stat(pid)
        if stat is None:
            return None
        pid = stat[0]
    return None


def age() -> float:
    """Seconds since this process started (its interpreter start-up and imports included)."""
    stat = _stat(os.getpid())
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    return uptime - stat[1] / os.sysconf("SC_CLK_TCK") if stat else 0.0


def git_commit() -> str | None:
    """HEAD of the repository this process runs in (a DVC experiment's copy has its own), or None."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
