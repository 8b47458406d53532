"""Independent pieces of a stage's work on the machine's idle cores: forks of the stage's process.

A stage runs torch on one intra-op thread (`threads: 1`, the default, so that its bytes do not depend
on the machine), which leaves the other cores idle. Where its work splits into independent pieces (the
score stage's criteria and its oracle), `run` forks workers that start with the model and the data
already in memory; every process, the stage's own included, takes the next piece from a shared queue,
and a worker sends back what it computed as tensors (`torch.save`, read with `weights_only`: nothing in
it runs). A piece is a function of what the fork inherited, so the results are the same bytes whichever
process computes it, and in whatever order.

Only on the CPU with one intra-op thread: a fork cannot use its parent's CUDA context, and an OpenMP
pool does not survive a fork. A worker dies with the stage (PR_SET_PDEATHSIG), prints no progress, and
leaves by `os._exit` (no atexit hook, no run closed, no buffer flushed twice).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from kdprune import procs
from kdprune.progress import Progress

Piece = tuple[str, Callable[[], Any]]  # (name, work): work() returns tensors, or dicts and lists of them


def count(device: Any, threads: int) -> int:
    """How many processes may share the work: the cores this process may run on, when it computes on
    the CPU on one thread; else 1."""
    if str(device) != "cpu" or threads != 1 or not hasattr(os, "fork"):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(pieces: Sequence[Piece], processes: int, on_done: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every piece's result by name, computed by up to `processes` processes (this one included); the
    longest pieces should come first. `on_done(name)` as each result reaches this process. However this
    ends (an error, a signal here or in a worker), no worker outlives it."""
    if len(pieces) > 255:
        raise ValueError(f"{len(pieces)} pieces: at most 255 share a queue")
    processes = min(processes, len(pieces))
    if processes <= 1:
        return {name: _done(name, work(), on_done) for name, work in pieces}
    take, put = os.pipe()  # the queue: a byte per piece, read one at a time (atomic, whoever reads)
    os.write(put, bytes(range(len(pieces))))
    os.close(put)
    workers: dict[int, int] = {}  # pid -> the read end of its results, until the worker is reaped
    parent = os.getpid()
    try:
        for _ in range(processes - 1):
            read, write = os.pipe()
            pid, held = procs.fork_holding()  # the stage's handlers never run in a worker
            if pid == 0:  # the worker: never returns
                _work(pieces, take, write, parent, [read, *workers.values()], held)
            os.close(write)
            workers[pid] = read
        results = {}
        while index := os.read(take, 1):
            name, work = pieces[index[0]]
            results[name] = _done(name, work(), on_done)
        while workers:
            pid, read = next(iter(workers.items()))
            blob = _read_all(read)
            _, status = os.waitpid(pid, 0)
            del workers[pid]
            os.close(read)
            if os.waitstatus_to_exitcode(status) != 0 or not blob:
                raise RuntimeError(f"a worker (pid {pid}) failed: {_how(status)}")
            for name, result in _load(blob).items():
                results[name] = _done(name, result, on_done)
    finally:
        os.close(take)
        for pid, read in workers.items():  # only when this ends early: stop the rest, now
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
            os.close(read)
    return {name: results[name] for name, _ in pieces}


def _done(name: str, result: Any, on_done: Callable[[str], None] | None) -> Any:
    if on_done is not None:
        on_done(name)
    return result


def _work(pieces: Sequence[Piece], take: int, write: int, parent: int, others: list[int], held: Any) -> None:
    """A worker's life: pieces from the queue until it is empty, the results down `write`, exit. It dies
    with the stage; `others` are descriptors of the stage's it has no use for."""
    status = 1
    try:
        for signum in procs.STAGE_SIGNALS:  # a stop ends a worker outright, then the signals held at the fork arrive
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        procs.die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # the stage died before we asked to die with it
            return
        for fd in others:
            os.close(fd)
        Progress.mute()
        import torch

        results = {}
        while index := os.read(take, 1):
            name, work = pieces[index[0]]
            results[name] = work()
        buf = io.BytesIO()
        torch.save(results, buf)
        view = memoryview(buf.getbuffer())
        while view:
            view = view[os.write(write, view):]
        status = 0
    except BaseException:  # noqa: BLE001 - reported below, and the stage fails on our status
        os.write(2, f"error: a worker of pid {parent} failed:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(status)


def _read_all(read: int) -> bytes:
    chunks = []
    while chunk := os.read(read, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _load(blob: bytes) -> dict[str, Any]:
    import torch

    stream = io.BytesIO(blob)
    return torch.load(stream, weights_only=True)


def _how(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit status {code} (its error is above)"
