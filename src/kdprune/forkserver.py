"""A warm start for stages: a process that has imported torch forks, and the fork runs the stage.

Importing torch takes 3-5 s of a stage's start on two cores, more than most digits stages compute.
The first stage that finds none starts a fork server (one per Python environment and version of this
file), and every stage hands itself over: `stage.guard` sends its argv, working directory,
environment, sys.path and stdin/stdout/stderr to the server, which forks. A stage under DVC that finds
the MLflow service the pipeline's stages need not up (the first; after a pause, the first whose server
is still warm) starts it first (kdprune.tracker.prestart); the first waits while the server imports
torch rather than importing it too: the same wait, and the other core is left to the service. Once its
fork has ended well, the stage that started the service returns only when that service answers, so the
next stage finds MLflow ready. The fork drops every kdprune module it inherited (so an edited module is imported
afresh, never a stale copy), takes on the stage's process state and runs the script as `__main__`; the
stage's own process waits, forwards SIGTERM, SIGINT and SIGHUP to it, and exits with its status. The fork dies with that
process: when the connection between them ends (even after SIGKILL) it gets SIGTERM, closes its run
KILLED and writes nothing, exactly as the stage would.

Only third-party packages are preloaded, and none that starts a thread at import (OpenBLAS's pool,
which numpy and scipy start, is quiesced by its own fork handler); the server never initialises
CUDA, sets no seed and no thread count (each stage does, first). It exits after KDPRUNE_WARM_IDLE
seconds (300 by default) without a stage, and is not used once a package is installed or removed in its
environment. KDPRUNE_FORKSERVER=off runs every stage in its own process; KDPRUNE_FORKSERVER=torch starts
a server that imports torch alone (for one stage run by hand, or a server that is only probed: the later
imports are seconds of CPU that no stage of theirs would use).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kdprune import procs
from kdprune.errors import TrackingError
from kdprune.switches import switch
from kdprune.tracker import (ServiceDown, await_ready, dial, prestart, retire, service_dir, start_service,
                             wait_gone, warm_idle, withdraw)

# imported before the first fork; then, one at a time between stages, what the stages import next (in
# the order the pipeline needs them). Never onnxruntime: it starts a thread at import, and a thread
# holding a lock across a fork leaves the lock held forever in the fork.
PRELOAD = ("torch",)  # validate needs no more; the training stages' optimisers import torch._dynamo (2 s)
LATER = ("numpy", "yaml", "sklearn.model_selection", "sklearn.datasets", "torch._dynamo", "torch.onnx", "onnx",
         "matplotlib.backends.backend_agg", "matplotlib.pyplot", "scipy.stats", "torchvision")
# what the interpreter or a preloaded library reads once, at start-up, import or first use (torch's
# kernel choice, ATEN_CPU_CAPABILITY; oneDNN's, ONEDNN_/DNNL_MAX_CPU_ISA): a server serves only stages
# that agree on them
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "LD_", "TORCH_", "PYTORCH_", "CUDA_", "ATEN_",
                   "ONEDNN_", "DNNL_", "KDPRUNE_SERVICE_DIR")
HEADER = struct.Struct("!I")


def enabled() -> bool:
    return (switch("KDPRUNE_FORKSERVER") != "off" and hasattr(os, "fork") and hasattr(socket, "send_fds")
            and not procs.forked())


def server_path() -> Path:
    """The server of this interpreter, packages and import-time environment, and of this process's
    privileges and limits: a fork has the server's, so a stage under `setpriv`, `ulimit`, `taskset`,
    `nice`, another cgroup or namespace gets a server started under the same. A torch-only server
    (KDPRUNE_FORKSERVER=torch) is another server: a pipeline never finds one that preloads nothing."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_TIME_ENV))
    key = hashlib.sha256(json.dumps([sys.executable, sys.path[1:], env, process_state(), packages(),
                                     switch("KDPRUNE_FORKSERVER") == "torch"]).encode()
                         + Path(__file__).read_bytes()).hexdigest()[:20]
    return fork_dir() / f"{key}.sock"


def fork_dir() -> Path:
    """Where the fork servers listen, made (0700) where it is missing; a folder that cannot hold it is named."""
    folder = service_dir() / "fork"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise TrackingError(f"KDPRUNE_SERVICE_DIR: {folder}: {e.strerror or e}") from None
    return folder


def packages() -> list[int]:
    """When the interpreter's site-packages last had an entry added or removed: an install, upgrade or
    removal (pip's and uv's each add or remove a `*.dist-info`) gives a server started before it a
    successor, so no stage runs the packages it had imported. (The interpreter's folders, not sys.path:
    a stage, a service and a test each have their own sys.path, and must agree on the zygote.)"""
    import sysconfig

    found = []
    for folder in sorted({sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}):
        with contextlib.suppress(OSError):
            found.append(os.stat(folder).st_mtime_ns)
    return found


def process_state() -> list[Any]:
    """What a fork inherits from the server, not from the process that hands the stage over (the umask,
    which the fork sets, aside)."""
    import resource

    kept = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
            "Cpus_allowed_list")
    state: list[Any] = [os.getpriority(os.PRIO_PROCESS, 0),
                        sorted((n, resource.getrlimit(getattr(resource, n))) for n in dir(resource)
                               if n.startswith("RLIMIT_"))]
    with contextlib.suppress(OSError):
        status = Path("/proc/self/status").read_text().splitlines()
        state.append([line for line in status if line.partition(":")[0] in kept])
        state.append(Path("/proc/self/cgroup").read_text())
        state.append(sorted(os.readlink(ns) for ns in Path("/proc/self/ns").iterdir()))
    return state


# ---------------------------------------------------------------- the stage's side


def hand_off() -> int | None:
    """Run this process's script in a fork of the server (started first when none listens): its exit
    status. None: run it here (the fork server is off, or did not start or fork). The environment is
    checked first (stage.check_environment)."""
    if not enabled():
        return None
    try:
        found = _forked()
        if found is None:
            return None
        pid, reply, service = found

        def forward(signum: int, frame: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for signum in procs.STAGE_SIGNALS:  # forwarded to the fork
            signal.signal(signum, forward)
    except KeyboardInterrupt:  # Ctrl-C before the fork runs: our hanging up ends it, if it exists yet
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    with reply:
        line = reply.readline()  # a forwarded signal interrupts nothing here (PEP 475 retries the read)
    if not line:
        print(f"error: the stage's process {pid} ended without an exit status (killed)", file=sys.stderr)
        return 1
    status = int(json.loads(line)["status"])
    if status == 0 and service is not None:  # it started the MLflow service: the next stage finds it ready
        for signum in procs.STAGE_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        await_ready(service)
    return status


def _forked() -> tuple[int, Any, Path | None] | None:
    """Send this process's script to the server (starting one when none listens): the fork's pid, the
    stream its exit status will come on, and the MLflow service this process started beside the
    server; None when no server forks it."""
    path, service = server_path(), None
    if procs.dvc_ancestor() is not None:  # a pipeline's stage: its tracked stages need the MLflow service,
        service = prestart()  # started here when it is not up (the first stage; the first after 30 s idle)
    try:
        sock = dial(path)
    except OSError:  # none listens: start one (it listens at once, and forks once it has imported torch)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
        try:
            sock = start_service(path, "kdprune.forkserver", env, timeout=10)
        except ServiceDown:
            return None
    with sock:
        procs.die_with_parent(signal.SIGTERM)  # the kernel ends us with the dvc that started us
        request = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
                              "umask": procs.umask(), "client": os.getpid()}).encode()
        try:
            socket.send_fds(sock, [HEADER.pack(len(request)) + request], [0, 1, 2])
            reply = sock.makefile("rb")
            line = reply.readline()  # a new server answers once it has imported torch
        except OSError:
            return None
        if not line:  # the server exited before forking: nothing ran
            return None
        return json.loads(line)["pid"], reply, service


def stop_all() -> list[str]:
    """Ask every server to exit now (the end of the tests) and wait until they are gone; stages running in
    their forks go on."""
    stopped = []
    for path in sorted((service_dir() / "fork").glob("*.sock")):
        with contextlib.suppress(OSError), dial(path) as sock:
            sock.sendall(HEADER.pack(2) + b"{}")
            stopped.append(path)
    wait_gone(stopped)
    return [str(p) for p in stopped]


# ---------------------------------------------------------------- the server


def serve(path: Path) -> None:
    idle = warm_idle()  # seconds without a running stage after which the server exits
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server.bind(str(path))
    server.listen(64)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in a terminal is for the stages
    for name in PRELOAD:
        with contextlib.suppress(ImportError), procs.collector_paused():
            __import__(name)
    children: set[int] = set()
    later = [] if switch("KDPRUNE_FORKSERVER") == "torch" else list(LATER)
    idle_since, retired = time.monotonic(), False
    try:
        while True:
            ready, _, _ = select.select([server], [], [], 0 if later or retired else 1.0)
            children -= _reaped(children)
            if retired and not ready:  # withdrawn: a stage that dialled (without the lock) before the socket
                break  # went has been served, and none can dial now
            if not ready and later:
                with contextlib.suppress(ImportError), procs.collector_paused():
                    __import__(later.pop(0))
                continue
            if ready:
                conn, _ = server.accept()
                with conn:
                    request, fds = _receive(conn)
                    if request is None:  # a probe, or the stages' end asked us to stop
                        if fds is None:
                            break
                        continue
                    # held until the fork has the stage's handlers: a signal forwarded to it at once is not
                    # lost to the server's SIG_IGN for SIGINT
                    pid, held = procs.fork_holding()
                    if pid == 0:
                        _child(server, conn, request, fds, held)  # never returns
                    children.add(pid)
                    for fd in fds:
                        os.close(fd)
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            if children:
                idle_since = time.monotonic()
            elif not retired and time.monotonic() - idle_since > idle and retire(server, path):
                retired = True
    finally:
        if not retired:  # asked to stop, or failed
            withdraw(path)
        server.close()


def _reaped(children: set[int]) -> set[int]:
    done = set()
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                done.add(pid)
    return done


def _receive(conn: socket.socket) -> tuple[dict[str, Any] | None, list[int] | None]:
    """(request, fds); (None, []) for a connection that sends nothing; (None, None) for `stop`."""
    conn.settimeout(10)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        if not data:
            return None, []
        while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
            more = conn.recv(1 << 16)
            if not more:
                raise OSError("the stage went away mid-request")
            data += more
    except OSError:  # the stage went away (it will run itself): nothing to fork, its descriptors closed
        for fd in fds:
            os.close(fd)
        return None, []
    request = json.loads(data[HEADER.size:])
    if not request:
        return None, None
    return request, fds


def _child(server: socket.socket, conn: socket.socket, request: dict[str, Any], fds: list[int],
           held: set[int]) -> None:
    """Become the stage: its descriptors, directory, environment and path, no inherited kdprune module;
    run its script; send the exit status; exit, whatever happens (never into the server's own way out).
    The stage's signals arrive blocked; `held` is the mask to restore once its handlers are in place."""
    status = 1
    try:
        server.close()
        conn.settimeout(None)
        os.setsid()  # out of the server's session: the server's end is not ours
        for signum in procs.STAGE_SIGNALS:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        env = request["env"]
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(env)
        os.environ[procs.FORKED_FOR] = str(request["client"])
        tempfile.tempdir = None  # asked once by torch._dynamo in the server: asked again, from the stage's TMPDIR
        sys.argv, sys.path = request["argv"], request["path"]
        _reopen_std_streams(bool(env.get("PYTHONUNBUFFERED")))
        for name in [m for m in sys.modules if m == "kdprune" or m.startswith("kdprune.")]:
            del sys.modules[name]

        def watch() -> None:  # the stage's process is gone (SIGKILL): end as if it had been signalled
            with contextlib.suppress(OSError):
                while conn.recv(1):
                    pass
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="stage-watchdog", daemon=True).start()
        import runpy

        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile lands here
            runpy.run_path(sys.argv[0], run_name="__main__")
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            status = 130
        except BaseException:  # noqa: BLE001 - what the interpreter would print, then its status
            import traceback

            traceback.print_exc()
            status = 1
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
    finally:
        os._exit(status)


def _reopen_std_streams(unbuffered: bool) -> None:
    """sys.stdout and friends over the stage's descriptors, buffered as the interpreter would."""
    def stream(fd: int, mode: str, errors: str, line: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = raw if unbuffered and mode == "w" else (io.BufferedWriter(raw) if mode == "w"
                                                            else io.BufferedReader(raw))
        return io.TextIOWrapper(buffered, encoding="utf-8", errors=errors, line_buffering=line,
                                write_through=unbuffered or fd == 2)

    sys.stdin = sys.__stdin__ = stream(0, "r", "strict", False)
    sys.stdout = sys.__stdout__ = stream(1, "w", "strict", os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", "backslashreplace", True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
