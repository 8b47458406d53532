"""Forked workers: every piece computed once, by whichever process, results back whole; a failure anywhere
fails the call and leaves no process behind."""

from __future__ import annotations

import os
import select

import pytest
import torch

from kdprune import workers

WAIT = 120.0  # seconds: a bound on waiting for the other process, never reached unless something is wrong


class Meeting:
    """Two pieces that each announce they have started and wait for the other: they can only finish when
    two processes run them at once, so a test that passes had both processes at work."""

    def __init__(self) -> None:
        self.pipes = {name: os.pipe() for name in ("a", "b")}

    def __enter__(self) -> Meeting:
        return self

    def __exit__(self, *exc: object) -> None:
        for fds in self.pipes.values():
            for fd in fds:
                os.close(fd)

    def piece(self, me: str, other: str, fail_in: str | None = None, parent: int = 0):
        def work() -> torch.Tensor:
            os.write(self.pipes[me][1], b"x")
            ready, _, _ = select.select([self.pipes[other][0]], [], [], WAIT)
            if not ready:
                raise TimeoutError(f"{me}: the other piece never started")
            if fail_in == "worker" and os.getpid() != parent or fail_in == "parent" and os.getpid() == parent:
                raise ValueError(f"piece {me} fails on purpose")
            return torch.tensor([os.getpid()])
        return work


def test_pieces_run_in_two_processes_and_come_back_in_order():
    for _ in range(10):  # which process takes "a" is the kernel's choice: every draw must come back right
        seen = []
        with Meeting() as meet:
            pieces = [("a", meet.piece("a", "b")), ("b", meet.piece("b", "a")),
                      ("c", lambda: {"n": torch.arange(3), "list": [torch.ones(2)]})]
            results = workers.run(pieces, 2, on_done=seen.append)
        assert list(results) == ["a", "b", "c"] and sorted(seen) == ["a", "b", "c"]
        assert results["a"].item() != results["b"].item()
        assert os.getpid() in (results["a"].item(), results["b"].item())
        assert torch.equal(results["c"]["n"], torch.arange(3)) and torch.equal(results["c"]["list"][0], torch.ones(2))


def test_one_process_runs_every_piece_here_in_order():
    order = []
    results = workers.run([(n, lambda n=n: order.append(n) or torch.tensor(os.getpid())) for n in "xyz"], 1)
    assert order == ["x", "y", "z"] and all(r.item() == os.getpid() for r in results.values())


def test_a_failing_worker_fails_the_call_with_its_error_on_stderr(capfd):
    before = _children()
    with Meeting() as meet, pytest.raises(RuntimeError, match=r"a worker \(pid \d+\) failed: exit status 1"):
        workers.run([(n, meet.piece(n, o, fail_in="worker", parent=os.getpid())) for n, o in (("a", "b"), ("b", "a"))],
                    2)
    assert "fails on purpose" in capfd.readouterr().err
    assert _children() <= before


def test_a_failure_here_stops_and_reaps_the_workers():
    before = _children()
    survived, mark = os.pipe()

    def slow() -> None:  # the worker sits here, and says so if it is still alive when the wait ends
        select.select([], [], [], WAIT)
        os.write(mark, b"survived")

    with Meeting() as meet, pytest.raises(ValueError, match="fails on purpose"):
        pieces = [(n, meet.piece(n, o, fail_in="parent", parent=os.getpid())) for n, o in (("a", "b"), ("b", "a"))]
        workers.run([*pieces, ("slow", slow)], 2)
    os.close(mark)
    assert os.read(survived, 100) == b""  # killed, not waited for
    os.close(survived)
    assert _children() <= before


class Interrupted(Exception):
    pass


def test_a_signal_while_collecting_stops_and_reaps_the_worker_at_once():
    """The stage, done with its own pieces, waits for the worker's; a signal then (SIGTERM from DVC,
    Ctrl-C) must end the worker, not wait for its piece to finish."""
    import signal

    before = _children()
    survived, mark = os.pipe()

    def interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    def piece(me: str, other: str):
        meet_work = meet.piece(me, other)

        def work() -> torch.Tensor:
            meet_work()  # both processes have a piece: the worker's now sits, the stage's returns
            if os.getpid() != parent:
                select.select([], [], [], WAIT)
                os.write(mark, b"survived")
            else:  # the signal comes once the stage has handed back its piece and collects the worker's
                signal.setitimer(signal.ITIMER_REAL, 0.2)
            return torch.zeros(1)
        return work

    parent = os.getpid()
    previous = signal.signal(signal.SIGALRM, interrupted)
    try:
        with Meeting() as meet, pytest.raises(Interrupted):
            workers.run([("a", piece("a", "b")), ("b", piece("b", "a"))], 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    os.close(mark)
    assert os.read(survived, 100) == b""  # killed, not waited for
    os.close(survived)
    assert _children() <= before


def test_workers_only_on_the_cpu_with_one_thread(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})  # 3 cores allowed, of more
    assert workers.count("cpu", 1) == 3
    assert workers.count(torch.device("cpu"), 1) == 3
    assert workers.count("cpu", 2) == 1
    assert workers.count("cuda", 1) == 1


def _children() -> set[int]:
    """This process's children, zombies included (a worker not reaped would show here)."""
    me = str(os.getpid())
    found = set()
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.add(int(stat))
    return found
