"""A stage's MLflow run, kept by the tracking service: the stage sends, the service logs.

Importing MLflow and opening its store take seconds. One service process per tracking store does
that once, and serves every stage of a pipeline (and every queue worker) over a Unix socket: a
stage connects in milliseconds, and its run is opened while it imports torch and loads its data.
The service closes a stage's run as KILLED when its connection ends without a `finish` (the stage
was killed, even with SIGKILL). It exits after IDLE seconds without a stage. Messages are JSON
lines both ways (plain data, never pickles); every call is answered, in order; a stage learns of a
failed asynchronous call at its next call and stops with the service's one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from kdprune import procs
from kdprune.errors import TrackingError
from kdprune.files import write_atomic
from kdprune.switches import switch

IDLE = 30.0  # seconds without a connected stage after which the service (of one store) exits
WARM_IDLE = 300.0  # the warm starts' (the fork server's, the zygote's): an edit-and-rerun loop's pause
START_TIMEOUT = 120.0  # seconds a stage waits for a service it started to listen
LOGS_MODELS = {"log_model"}  # ops that call MLflow's Model.log, which must not overlap the warm-up
# The services this process started, kept for its life (those that ended are reaped, not dropped): a Popen
# collected while its process runs calls Python code (Popen.__del__), and a Ctrl-C landing there is
# ignored, as every exception raised in a __del__ is: the first stage ran on after its Ctrl-C, now and then
_STARTED: list[subprocess.Popen] = []


# The longest name a socket has under service_dir() (the fork server's: fork/<20 hex digits>.sock), and the
# longest path Linux binds a Unix socket to (sun_path's 108 bytes, less the terminating zero)
SOCKET_NAME = len("/fork/") + 20 + len(".sock")
SOCKET_PATH = 107


def service_dir(make: bool = True) -> Path:
    """Where the services listen: $KDPRUNE_SERVICE_DIR (made absolute: a fork server and a queued
    experiment's copy have other working folders), or a folder private to this user in /tmp; made unless
    `make` is false. One too long for the sockets in it, or that cannot be made, is an error naming it: a
    socket bound to a longer path fails, and every stage would wait for a service that can never start."""
    raw = os.environ.get("KDPRUNE_SERVICE_DIR") or f"/tmp/kdprune-{os.getuid()}"
    path = Path(raw).absolute()
    size = len(os.fsencode(path))
    if size + SOCKET_NAME > SOCKET_PATH:
        shown = raw if str(path) == raw else f"{raw} ({path})"
        raise TrackingError(f"KDPRUNE_SERVICE_DIR: {shown} is too long for the sockets in it (at most "
                            f"{SOCKET_PATH - SOCKET_NAME} bytes as an absolute path, got {size})")
    if make:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"KDPRUNE_SERVICE_DIR: {path}: {e.strerror or e}") from None
    _check_private(path)
    return path


def _check_private(path: Path) -> None:
    """A stage hands its environment (the store's keys) and its terminal to whatever listens in the folder:
    one another user owns, or may write in, could have put a socket of theirs there (/tmp/kdprune-<uid> is
    theirs to make first after every reboot). Refused, as ssh refuses such a key folder."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return  # (not there: a look that makes nothing)
    except OSError as e:
        raise TrackingError(f"KDPRUNE_SERVICE_DIR: {path}: {e.strerror or e}") from None
    if info.st_uid != os.getuid():
        raise TrackingError(f"KDPRUNE_SERVICE_DIR: {path}: owned by another user (uid {info.st_uid}), who could "
                            "listen in it for this stage's environment and terminal; use a folder of your own")
    if info.st_mode & 0o022:
        raise TrackingError(f"KDPRUNE_SERVICE_DIR: {path}: others may write in it (mode "
                            f"{stat.S_IMODE(info.st_mode):o}) and put a socket of theirs there; chmod go-w it, "
                            "or use another folder")


def warm_idle() -> float:
    """Seconds a warm start (the fork server, the zygote) waits for its next use before it exits:
    $KDPRUNE_WARM_IDLE, or WARM_IDLE. They are per environment, not per store, and 30 s was shorter than
    the look at a result between two `dvc repro`s, after which the next paid their 4-7 s of CPU again."""
    raw = os.environ.get("KDPRUNE_WARM_IDLE", "")
    try:
        seconds = float(raw) if raw else WARM_IDLE
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"KDPRUNE_WARM_IDLE: expected a number of seconds, got {raw!r}")
    return seconds


# Every kdprune module a service runs: those it answers with and what they import (tests/test_tracking.py
# checks the list against their imports; procs, files, errors and switches had been left out, and a service
# forked from a zygote kept an edited procs.py's old code)
SERVICE_MODULES = ("tracker", "runs", "summary", "registry", "store", "procs", "files", "errors", "switches")


def service_code() -> bytes:
    """The source of the modules a service runs: a service, or a zygote, serves only its own version."""
    here = Path(__file__).parent
    return b"".join((here / f"{m}.py").read_bytes() for m in SERVICE_MODULES)


def service_key(uri: str, experiment: str) -> str:
    """One service per store and experiment, and per version of the code, and of the packages, that serve
    them (a service in use had kept the MLflow it imported after an upgrade)."""
    from kdprune.forkserver import packages

    parts = [uri.encode(), experiment.encode(), service_code(), json.dumps(packages()).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def service_socket(uri: str, experiment: str) -> Path:
    """Where the service of a store and experiment listens."""
    return service_dir() / f"{service_key(uri, experiment)}.sock"


class Tracker:
    """The stage's end: `call(op, **args)` waits for the answer, `post(op, **args)` does not."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.sock = _connect(service_socket(uri, experiment), uri, experiment)
        self.sent = self.answered = 0
        self.waited = 0.0  # seconds this process spent blocked on the service (bench/pipeline.py reads it)
        self.buffer = b""
        self.results: dict[int, Any] = {}

    def post(self, op: str, **args: Any) -> int:
        self._collect(block=False)
        return self._send(op, args)

    def _send(self, op: str, args: dict[str, Any]) -> int:
        line = (json.dumps({"id": self.sent + 1, "op": op, "args": args}) + "\n").encode()
        with _sigterm_blocked():  # a message is written whole or not at all
            try:
                self.sock.sendall(line)
            except OSError:
                raise TrackingError(self._gone()) from None
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

    def last(self, op: str, **args: Any) -> bool:
        """A stage's last message when it failed (`finish` FAILED or KILLED): sent before any earlier answer
        is read, and waited for past earlier messages' errors (the first of those had stopped it unsent, and
        the service then closed the failed stage's run as KILLED). True when the service answered it."""
        try:
            ident = self._send(op, args)
        except TrackingError:  # gone
            return False
        while self.answered < ident:
            before = self.answered
            try:
                self._collect(block=True)
            except TrackingError:
                if self.answered == before or self.answered >= ident:  # gone, or this one failed
                    return False
        return True

    def close(self, wait: bool) -> None:
        """Hang up: a run still open is closed as KILLED by the service."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def _collect(self, block: bool) -> None:
        while True:
            ready, _, _ = select.select([self.sock], [], [], None if block else 0)
            if not ready:
                return
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                raise TrackingError(self._gone())
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            errors = [error for line in lines if (error := self._answer(json.loads(line)))]
            if errors:  # every answer read first: one after an error had been dropped with the chunk
                raise TrackingError(errors[0])
            if lines:
                return

    def _answer(self, reply: dict[str, Any]) -> str | None:
        """Record an answer; its error, if it is one."""
        self.answered = reply["id"]
        if "error" in reply:
            return reply["error"]
        self.results[reply["id"]] = reply.get("ok")
        return None

    def _gone(self) -> str:
        return f"the MLflow tracking service for {self.uri} went away (see {service_dir()}/*.log)"


class Offline:
    """KDPRUNE_TRACKING=off: no service, no run, every call answered with None. For a machine without
    MLflow (a GPU box timing stages); DVC's outputs are the same bytes either way."""

    waited = 0.0

    def post(self, op: str, **args: Any) -> int:
        return 0

    def wait(self, ident: int) -> Any:
        return None

    def call(self, op: str, **args: Any) -> Any:
        return None

    def last(self, op: str, **args: Any) -> bool:
        return True

    def close(self, wait: bool) -> None:
        return None


def start() -> Tracker | Offline:
    """This stage's connection to the service of its store, or none when KDPRUNE_TRACKING=off."""
    if switch("KDPRUNE_TRACKING") == "off":
        return Offline()
    from kdprune import store

    return Tracker(store.tracking_uri(), store.experiment_name())


def prestart() -> Path | None:
    """Start the service of this process's store when none listens, without waiting for it (a stage of a
    pipeline, before it hands itself to the fork server): MLflow's import and the store's opening then
    overlap torch's, or the stage's own run, instead of the first tracked stage waiting for them. A
    service that fails to start is reported by the first stage that connects. Returns where it will
    listen (for await_ready); None when one listens already or tracking is off."""
    if switch("KDPRUNE_TRACKING") == "off":
        return None
    from kdprune import store

    uri, experiment = store.tracking_uri(), store.experiment_name()
    path = service_socket(uri, experiment)
    with contextlib.suppress(OSError), dial(path):
        return None  # up already: nothing to start, nothing to wait for
    try:
        start_service(path, "kdprune.tracker", _service_env(uri, experiment), START_TIMEOUT, wait=False)
    except OSError:
        return None
    return path


def await_ready(path: Path, timeout: float = START_TIMEOUT) -> None:
    """Wait until the service at `path` answers (MLflow imported, the store opened and read): the stage
    that prestarted it returns then, so its start-up is the pipeline's, not the next stage's tracking.
    Quietly, and at once when the process started for it has ended unheard: a service that does not
    come up is reported by the first stage that connects."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sock = dial(path)
        except OSError:
            starting = _read(path.with_suffix(".starting"))
            if not starting or procs.alive(starting) is False:
                return
            time.sleep(0.05)
            continue
        with contextlib.suppress(OSError), sock, sock.makefile("rb") as answers:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            sock.sendall(b'{"id": 1, "op": "ready", "args": {}}\n')
            answers.readline()
        return


def _service_env(uri: str, experiment: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=experiment)
    env.pop("DVC_EXP_NAME", None)
    return env


def _connect(path: Path, uri: str, experiment: str) -> socket.socket:
    """Connect to the service at `path`, starting it first when none listens."""
    try:
        return start_service(path, "kdprune.tracker", _service_env(uri, experiment), START_TIMEOUT)
    except ServiceDown as e:
        raise TrackingError(f"the MLflow tracking service for {uri} did not start ({e})") from None


class ServiceDown(OSError):
    """A service that was started did not listen."""


def start_service(path: Path, module: str, env: dict[str, str], timeout: float,
                  wait: bool = True) -> socket.socket | None:
    """A connection to the service listening at `path`; when none does, `python -m <module> <path>` is
    started (in a session of its own, its log beside the socket) and waited for. Under a lock, so two
    processes that find none at once start one, and a service never exits while one connects (the
    tracking service, the fork server and the zygote try it before their idle exit: retire). `wait=False` starts it
    and returns None at once; whoever comes next waits for that process (its identity is kept beside
    the socket) rather than starting a second one, and starts its own if that one ends unheard."""
    from filelock import FileLock

    env = {**env, "KDPRUNE_SERVICE_DIR": str(service_dir())}  # absolute: a service runs in a folder of its own

    def spawn() -> tuple[subprocess.Popen | None, str]:
        from kdprune import zygote

        proc, pid = None, zygote.fork_service(path, env) if module == zygote.MODULE else None
        if pid is None:
            with path.with_suffix(".log").open("ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", module, str(path)], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, env=env, cwd=path.parent, start_new_session=True,
                                        close_fds=True)
            _STARTED.append(proc)
            pid = proc.pid
        ident = procs.identity(pid) or ""
        write_atomic(starting, ident)
        return proc, ident

    for started in _STARTED:
        started.poll()  # reaps one that ended (a long-lived process, such as a notebook, starts many)
    starting = path.with_suffix(".starting")
    with FileLock(str(path.with_suffix(".lock"))):
        with contextlib.suppress(OSError):
            sock = dial(path)
            if wait:
                return sock
            sock.close()
            return None
        proc, ident, mine = None, _read(starting), False  # one started earlier (maybe retiring) may listen soon
        if not ident or not procs.alive(ident):
            (proc, ident), mine = spawn(), True
        if not wait:
            return None
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                return dial(path)
            ended = proc.poll() is not None if proc else not procs.alive(ident)
            if ended and not mine:
                (proc, ident), mine = spawn(), True
            elif ended or time.monotonic() > deadline:
                status = ("exited" if proc is None else f"exit {proc.poll()}") if ended else "not listening"
                raise ServiceDown(f"{status}; see {path.with_suffix('.log')}")
            time.sleep(0.01)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def dial(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _sigterm_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop(uri: str, experiment: str) -> None:
    """Ask the service of one store to exit now (a test that made the store)."""
    _stop(service_socket(uri, experiment))


def forget(uri: str, experiment: str) -> None:
    """Remove the lock and log files the (stopped) service of one store leaves, once the store is gone."""
    base = service_socket(uri, experiment)
    for suffix in (".lock", ".log", ".starting"):
        base.with_suffix(suffix).unlink(missing_ok=True)


def stop_all(zygotes: bool = True) -> list[str]:
    """Ask every service under service_dir() to exit now (the end of the tests), and every zygote unless
    `zygotes` is false (as the services' own idle exit leaves them); wait until they are gone."""
    stopped = [p for p in sorted(service_dir().glob("*.sock"))
               if (zygotes or not p.name.startswith("zyg-")) and _stop(p)]
    wait_gone(stopped)
    return [str(p) for p in stopped]


def retire(server: socket.socket, path: Path) -> bool:
    """Whether an idle service (or zygote, or fork server) may exit: nobody waiting to connect, and nobody
    holding the lock start_service takes (so nobody is starting or dialling it right now; a zygote's
    caller holds it while waiting for the fork, so retire never waits for it). One that may exit is
    withdrawn under that lock: whoever comes next starts another at once, and never dials this one on
    its way out."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path.with_suffix(".lock")))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return False
    try:
        if select.select([server], [], [], 0)[0]:
            return False
        _withdraw(path)
        return True
    finally:
        lock.release()


def withdraw(path: Path) -> None:
    """A service leaving for another reason (asked to stop, failed), withdrawn under the lock (a socket
    removed without it could be that of a service started since)."""
    from filelock import FileLock

    with FileLock(str(path.with_suffix(".lock"))):
        _withdraw(path)


def _withdraw(path: Path) -> None:
    """The socket and the record of the process started for it (start_service waits for a process so
    recorded to listen, rather than starting another, for as long as it lives)."""
    path.with_suffix(".starting").unlink(missing_ok=True)  # first: a socket gone means both are (wait_gone)
    path.unlink(missing_ok=True)


def wait_gone(sockets: list[Path], timeout: float = 30.0) -> None:
    """Until each service has removed its socket on its way out (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in sockets) and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop(path: Path) -> bool:
    """Only between stages: a run still open in the service would be left RUNNING (reconciled later)."""
    with contextlib.suppress(OSError):
        sock = dial(path)
        with sock:
            sock.sendall(b'{"id": 1, "op": "stop", "args": {}}\n')
            sock.recv(1 << 10)
        return True
    return False


# ---------------------------------------------------------------- the service


class Service:
    """Listens on a socket; one thread per connected stage; exits after IDLE seconds without one."""

    def __init__(self, path: Path) -> None:
        from kdprune import registry, runs, store, summary  # imported already (zygote.preload)

        self.path, self.sessions, self.stopping = path, 0, False
        self.lock = threading.Lock()
        # One MLflow call at a time: its client keeps process-wide state it does not guard for threads.
        # Model.log patches os.environ's class to record the variables read while it logs, then iterates
        # them: two stages logging models at once (a queue's -j 2) failed one with "Set changed size
        # during iteration". The tracking URI and the tracer provider it resets are global too.
        self.calls = threading.Lock()
        self.ops = {"open": runs.open_run, "log_epoch": runs.log_epoch, "log_artifact": runs.log_artifact,
                    "log_model": runs.log_model, "set_tags": runs.set_tags, "finish": runs.finish,
                    "summarise": summary.summarise, "register": registry.register, "ready": lambda: None}
        self.runs = runs
        store.configure()

        # Model logging imported and exercised (runs.warm_up: 0.6-0.9 s of CPU, most of it holding the GIL)
        # once the first stage has gone, in a pipeline while DVC moves to the next: beside a stage's calls it
        # made them 3-7 times slower. "pending", then "running" (and over once the thread has ended), or
        # "skipped" by a log_model that came first.
        self.warmth, self.between = "pending", threading.Event()
        self.stage_gone = False  # a stage's session has ended (await_ready's question is none)

        def warm() -> None:
            with self.calls, procs.collector_paused():  # the store opened, and read, before a stage needs it
                _quietly(lambda: runs.warm_reads(store.ensure_experiment()))
            self.between.wait()
            with self.lock:
                if self.warmth != "pending":
                    return
                self.warmth = "running"
            with procs.collector_paused():  # (what it imported never scanned again: a stage's call waited 0.17 s
                _quietly(runs.warm_up)  # on a full collection of it)

        self.warm = threading.Thread(target=warm, daemon=True)
        self.warm.start()

    def serve(self, server: socket.socket) -> None:
        idle_since, retired = time.monotonic(), False
        try:
            while not self.stopping:
                ready, _, _ = select.select([server], [], [], 1.0)
                if ready:
                    conn, _ = server.accept()
                    threading.Thread(target=self.session, args=(conn,), daemon=True).start()
                    continue
                with self.lock:
                    busy = self.sessions > 0
                if busy:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE and retire(server, self.path):
                    retired = True
                    break
        finally:
            if not retired:  # asked to stop, or failed
                withdraw(self.path)
            server.close()

    def session(self, conn: socket.socket) -> None:
        """One stage: its messages in order, each answered; a run it leaves open is closed KILLED."""
        with self.lock:
            self.sessions += 1
        asked: set[str] = set()  # nothing (prestart's look), or "ready" alone (await_ready's): no stage's
        try:
            with conn, conn.makefile("rb") as lines:
                for line in lines:
                    message = json.loads(line)
                    if message["op"] == "stop":
                        self.stopping = True
                        conn.sendall(b'{"id": 1, "ok": null}\n')
                        return
                    asked.add(message["op"])
                    conn.sendall((json.dumps(self.answer(message), default=str) + "\n").encode())
        except OSError:
            pass  # the stage went away mid-reply: below, its run is closed
        finally:
            with contextlib.suppress(Exception), self.calls:
                self.runs.finish("KILLED")  # a no-op after a `finish`
            with self.lock:
                self.sessions -= 1
                self.stage_gone = self.stage_gone or bool(asked - {"ready"})
                if not self.sessions and self.stage_gone:
                    self.between.set()

    def before_model_logging(self) -> None:
        """Model.log records the os.environ reads made while it logs, in any thread, then iterates the
        record: it never runs beside the warm-up. A warm-up under way is waited for; one not begun is
        skipped (the call imports what it needs itself)."""
        with self.lock:
            if self.warmth == "pending":
                self.warmth = "skipped"
            started = self.warmth == "running"
        if started:
            self.warm.join()  # at once when it is over

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            if message["op"] in LOGS_MODELS:
                self.before_model_logging()
            with self.calls:
                return {"id": message["id"], "ok": self.ops[message["op"]](**message["args"])}
        except Exception as e:  # noqa: BLE001 - every failure becomes the stage's one-line error
            if not isinstance(e, TrackingError) and type(e).__module__.split(".")[0] != "mlflow":
                import traceback  # a bug, here or in a library: its traceback goes to the service's log

                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message['op']} failed:", file=sys.stderr)
                traceback.print_exc()
            text = str(e).strip()
            return {"id": message["id"], "error": text.splitlines()[0] if text else type(e).__name__}


def _quietly(fn: Any) -> None:
    with contextlib.suppress(Exception):  # only a speed-up: a real failure shows in log_model
        fn()


def listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server.bind(str(path))
    server.listen(64)
    return server


def serve(server: socket.socket) -> None:
    Service(Path(server.getsockname())).serve(server)


def main(path: str) -> None:
    """A service started as a process of its own. It listens first (a stage connects at once and waits
    only for its first answer), imports what it needs, leaves a zygote behind for the next store's
    service (kdprune.zygote), then serves."""
    from kdprune import store, zygote

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines ("Creating initial tables") are noise
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the stages
    server = listen(Path(path))
    with procs.collector_paused():
        zygote.preload(store.tracking_uri())
    zygote.leave_behind(server)
    serve(server)


if __name__ == "__main__":
    main(sys.argv[1])
