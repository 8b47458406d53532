"""A warm start for tracking services: a process that has imported MLflow forks one service per store.

A tracking service (kdprune.tracker) spends about 4 s of CPU importing MLflow and its SQL store
before its first answer. A pipeline needs one; a team member who moves between clones and stores, or
the tests (a store per test), start many. So the first service, once it has imported them and before
it starts a thread or opens a store, leaves a zygote behind (when none listens): a process that waits
for a request and forks. The next service, of another store, is such a fork: it takes the environment,
working directory, umask, session and log that `python -m kdprune.tracker` would have had, and serves
at once. Anything going wrong on the way (no zygote, one retiring, a reply lost) falls back to the
plain start.

The zygote is keyed like the fork server (interpreter, import-time environment, privileges and
limits, installed packages) and by the service's code; it never opens a store, never starts a thread,
and exits after KDPRUNE_WARM_IDLE seconds (300 by default) without a request or when asked to
(`tracker.stop_all`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from kdprune import procs
from kdprune.tracker import dial, retire, service_code, service_dir, warm_idle

MODULE = "kdprune.tracker"  # the service this forks


def socket_path(env: dict[str, str]) -> Path:
    """The zygote for services started with `env` from this process."""
    from kdprune import forkserver

    prefixes = (*forkserver.IMPORT_TIME_ENV, "MLFLOW_")
    per_store = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
    imports = sorted((k, v) for k, v in env.items() if k.startswith(prefixes) and k not in per_store)
    code = service_code() + Path(__file__).read_bytes()
    key = hashlib.sha256(json.dumps([sys.executable, imports, forkserver.process_state(), forkserver.packages()])
                         .encode() + code)
    return service_dir() / f"zyg-{key.hexdigest()[:16]}.sock"  # as long as a service's: it fits where theirs do


def preload(uri: str) -> None:
    """What every service imports before its first answer, in the order it needs it."""
    import mlflow  # noqa: F401
    import mlflow.onnx  # noqa: F401 - model logging (runs.warm_up)

    from kdprune import registry, runs, store, summary  # noqa: F401

    if not uri.startswith(("http:", "https:", "databricks", "file:")) and "://" in uri:
        from mlflow.store.tracking import sqlalchemy_store  # noqa: F401 - a database store


def fork_service(path: Path, env: dict[str, str]) -> int | None:
    """The pid of a service for the socket `path`, forked by the zygote for `env`; None when no zygote
    answers (the caller then starts the service itself)."""
    from filelock import FileLock

    zygote = socket_path(env)
    request = {"op": "fork", "args": {"path": str(path), "env": env, "umask": procs.umask()}}
    with contextlib.suppress(OSError, ValueError, KeyError), FileLock(str(zygote.with_suffix(".lock"))):
        with dial(zygote) as sock, sock.makefile("rwb") as stream:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            return int(json.loads(stream.readline())["ok"])
    return None


def leave_behind(service: socket.socket) -> None:
    """In a service started as `python -m kdprune.tracker`, after `preload`: fork a zygote for this
    process's environment when none listens. `service` is the service's own socket (not the zygote's).
    Only a speed-up: a failure is logged, and the service serves all the same."""
    try:
        _leave_behind(service)
    except Exception:  # noqa: BLE001
        traceback.print_exc()


def _leave_behind(service: socket.socket) -> None:
    from filelock import FileLock

    path = socket_path(dict(os.environ))
    with FileLock(str(path.with_suffix(".lock"))):
        with contextlib.suppress(OSError):
            dial(path).close()
            return
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server.bind(str(path))
        server.listen(64)
        middle = os.fork()
        if middle == 0:  # detached at once (the service never waits for it): the zygote is init's child
            with contextlib.suppress(BaseException):
                if os.fork() == 0:
                    service.close()
                    _zygote(server, path)
            os._exit(0)
        server.close()
        os.waitpid(middle, 0)


def _zygote(server: socket.socket, path: Path) -> None:
    code = 1
    try:
        os.setsid()
        _redirect(path.with_suffix(".log"))
        with contextlib.suppress(OSError):
            Path("/proc/self/comm").write_text("kdprune-zygote")
        _serve(server, path)
        code = 0
    except BaseException:  # noqa: BLE001 - a zygote that fails leaves a traceback in its log and exits
        traceback.print_exc()
    finally:
        os._exit(code)


def _serve(server: socket.socket, path: Path) -> None:
    idle, idle_since = warm_idle(), time.monotonic()
    while True:
        _reap()
        ready, _, _ = select.select([server], [], [], 1.0)
        if not ready:
            if time.monotonic() - idle_since > idle and retire(server, path):
                return
            continue
        conn, _ = server.accept()
        idle_since = time.monotonic()
        with conn, conn.makefile("rb") as lines:
            with contextlib.suppress(OSError, ValueError, KeyError):
                message = json.loads(lines.readline())
                if message["op"] == "stop":
                    conn.sendall(b'{"id": 1, "ok": null}\n')
                    # not under the lock (tracker.withdraw): fork_service holds it while it waits for our reply
                    path.unlink(missing_ok=True)
                    return
                pid = os.fork()
                if pid == 0:
                    _service(server, conn, message["args"])
                conn.sendall(json.dumps({"ok": pid}).encode() + b"\n")


def _service(server: socket.socket, conn: socket.socket, args: dict[str, Any]) -> None:
    """In a fork of the zygote: become the process `python -m kdprune.tracker <path>` would have been
    (tracker.start_service), then serve."""
    code = 1
    try:
        server.close()
        conn.close()
        os.setsid()
        with contextlib.suppress(OSError):
            Path("/proc/self/comm").write_text(Path(sys.executable).name[:15])
        path = Path(args["path"])
        _redirect(path.with_suffix(".log"))
        os.environ.clear()
        os.environ.update(args["env"])
        os.chdir(path.parent)
        os.umask(args["umask"])
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        sys.argv = [sys.argv[0], str(path)]
        from kdprune import tracker

        tracker.serve(tracker.listen(path))
        code = 0
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _redirect(log: Path) -> None:
    """stdin from /dev/null, stdout and stderr appended to `log`, as tracker.start_service starts a service."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass

