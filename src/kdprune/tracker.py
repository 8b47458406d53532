"""A stage's MLflow run, kept by a helper process: the stage sends, the helper logs.

Importing MLflow and opening its store take seconds; a helper process does that on the second
core while the stage imports torch and loads its data, so tracking costs a stage little wall
time. The helper also outlives a stage killed with SIGKILL just long enough to close its run as
KILLED: it sees its input end without a `finish`. Messages are JSON lines both ways (plain data,
never pickles); every call is answered, in order; a stage learns of a failed asynchronous call at
its next call and stops with the helper's one-line message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

from kdprune.errors import TrackingError


class Tracker:
    """The stage's end: `call(op, **args)` waits for the answer, `post(op, **args)` does not."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kdprune.tracker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        self.sent = self.answered = 0
        self.waited = 0.0  # seconds this process spent blocked on the helper (bench/pipeline.py reads it)
        self.buffer = b""
        self.results: dict[int, Any] = {}

    def post(self, op: str, **args: Any) -> int:
        self._collect(block=False)
        line = (json.dumps({"id": self.sent + 1, "op": op, "args": args}) + "\n").encode()
        with _sigterm_blocked():  # a message is written whole or not at all
            try:
                self.proc.stdin.write(line)
            except BrokenPipeError:
                raise TrackingError(self._died()) from None
        self.sent += 1
        return self.sent

    def wait(self, ident: int) -> Any:
        """The answer to message `ident` (and to every one before it), raising the first error."""
        start = time.perf_counter()
        try:
            while self.answered < ident:
                self._collect(block=True)
        finally:
            self.waited += time.perf_counter() - start
        return self.results.pop(ident, None)

    def call(self, op: str, **args: Any) -> Any:
        return self.wait(self.post(op, **args))

    def close(self, wait: bool) -> None:
        """End the helper: it closes any run still open as KILLED when its input ends. After a `finish`
        was answered there is nothing left to wait for but its interpreter's exit."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if wait:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _collect(self, block: bool) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], None if block else 0)
            if not ready:
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise TrackingError(self._died())
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                self._answer(json.loads(line))
            if lines:
                return

    def _answer(self, reply: dict[str, Any]) -> None:
        self.answered = reply["id"]
        if "error" in reply:
            raise TrackingError(reply["error"])
        self.results[reply["id"]] = reply.get("ok")

    def _died(self) -> str:
        code = self.proc.poll()
        return f"the MLflow tracking helper exited{f' with code {code}' if code is not None else ''}"


class Offline:
    """KDPRUNE_TRACKING=off: no helper, no run, every call answered with None. For a machine without
    MLflow (a GPU box timing stages); DVC's outputs are the same bytes either way."""

    waited = 0.0

    def post(self, op: str, **args: Any) -> int:
        return 0

    def wait(self, ident: int) -> Any:
        return None

    def call(self, op: str, **args: Any) -> Any:
        return None

    def close(self, wait: bool) -> None:
        return None


def start() -> Tracker | Offline:
    """The helper for this stage, or none when KDPRUNE_TRACKING=off."""
    return Offline() if os.environ.get("KDPRUNE_TRACKING", "on") == "off" else Tracker()


@contextlib.contextmanager
def _sigterm_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------- the helper process


def serve() -> None:
    """Answer a stage's messages until its pipe closes; close a run left open as KILLED."""
    from kdprune import registry, runs, store, summary

    store.configure()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines ("Creating initial tables") are noise
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stage decides; its end of the pipe tells us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ops = {"open": runs.open_run, "log_epoch": runs.log_epoch, "log_artifact": runs.log_artifact,
           "log_model": runs.log_model, "set_tags": runs.set_tags, "finish": runs.finish,
           "summarise": summary.summarise, "register": registry.register}
    # The replies get a private copy of stdout; whatever MLflow prints ("View run ... at ..." after a run
    # on a server) goes to stderr and can never corrupt a reply.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin.buffer:
        message = json.loads(line)
        try:
            reply = {"id": message["id"], "ok": ops[message["op"]](**message["args"])}
        except Exception as e:  # noqa: BLE001 - every failure becomes the stage's one-line error
            text = str(e).strip()
            reply = {"id": message["id"], "error": text.splitlines()[0] if text else type(e).__name__}
        out.write((json.dumps(reply, default=str) + "\n").encode())
        if message["op"] == "open" and "error" not in reply:
            with contextlib.suppress(Exception):  # only a speed-up: a real failure shows in log_model
                runs.warm_up()
    with contextlib.suppress(Exception):
        runs.finish("KILLED")


if __name__ == "__main__":
    serve()
