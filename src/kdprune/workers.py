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
    longest pieces should come first. `on_done(name)` as each result reaches this process."""
    if len(pieces) > 255:
        raise ValueError(f"{len(pieces)} pieces: at most 255 share a queue")
    processes = min(processes, len(pieces))
    if processes <= 1:
        return {name: _done(name, work(), on_done) for name, work in pieces}
    take, put = os.pipe()  # the queue: a byte per piece, read one at a time (atomic, whoever reads)
    os.write(put, bytes(range(len(pieces))))
    os.close(put)
    workers: dict[int, int] = {}  # pid -> the read end of its results
    try:
        for _ in range(processes - 1):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                os.close(read)
                _work(pieces, take, write)
            os.close(write)
            workers[pid] = read
        results = {}
        while index := os.read(take, 1):
            name, work = pieces[index[0]]
            results[name] = _done(name, work(), on_done)
        while workers:
            pid, read = workers.popitem()
            for name, result in _collect(pid, read).items():
                results[name] = _done(name, result, on_done)
    finally:
        os.close(take)
        for pid, read in workers.items():  # only on failure here: stop the others
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
    return {name: results[name] for name, _ in pieces}


def _done(name: str, result: Any, on_done: Callable[[str], None] | None) -> Any:
    if on_done is not None:
        on_done(name)
    return result


def _work(pieces: Sequence[Piece], take: int, write: int) -> None:
    """A worker's life: pieces from the queue until it is empty, the results down `write`, exit."""
    status = 1
    try:
        procs.die_with_parent(signal.SIGKILL)
        for signum in (signal.SIGINT, signal.SIGTERM):  # the stage handles these; a worker just ends
            signal.signal(signum, signal.SIG_DFL)
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
        os.write(2, f"error: a worker of pid {os.getppid()} failed:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(status)


def _collect(pid: int, read: int) -> dict[str, Any]:
    """A worker's results, once it has exited well (it is reaped either way)."""
    import torch

    chunks = []
    try:
        while chunk := os.read(read, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not chunks:
        raise RuntimeError(f"a worker (pid {pid}) failed: {_how(status)}")
    stream = io.BytesIO(b"".join(chunks))
    return torch.load(stream, weights_only=True)


def _how(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit status {code} (its error is above)"
