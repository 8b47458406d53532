"""MLflow tracking with real parts: real stores, a real server, real stage subprocesses, real signals.

A brand-new sqlite store opened by several stages at once, a server that is down, a real `mlflow
server` (killed mid-stage and restarted), stages that fail, are interrupted or are killed, and
`kdprune doctor` closing what a dead process left open.

Every stage here is a real subprocess (`python stages/<stage>.py`), with its real tracking end. Nothing is
timed except as a loose upper bound; conditions are polled for, with generous limits."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest
import yaml

from tests.conftest import REPO, run_stage, stage_env, stage_paths, tree_bytes, write_params

pytestmark = pytest.mark.slow

PY = sys.executable
T = TypeVar("T")


# -- helpers -----------------------------------------------------------------------------------------------


def env_for(uri: str) -> dict[str, str]:
    """A stage's environment, outside DVC (no DVC_* variable, so no `dvc` watchdog and no recovery hint)."""
    env = stage_env(uri)
    for key in [k for k in env if k.startswith("DVC_")]:
        del env[key]
    return env


class Stage:
    """One stage (or `kdprune` command) as a subprocess, its stdout and stderr in files."""

    def __init__(self, argv: list[str], cwd: Path, uri: str, logs: Path) -> None:
        from kdprune import procs

        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_file, self.stderr_file = logs / "stdout.txt", logs / "stderr.txt"
        with self.stdout_file.open("w") as out, self.stderr_file.open("w") as err:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env_for(uri), stdout=out, stderr=err)
        self.owner = procs.identity(self.proc.pid)  # its runs' pipeline.owner tag

    @property
    def stdout(self) -> str:
        return self.stdout_file.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text()

    def tail(self) -> str:
        return f"stdout:\n{self.stdout[-1500:]}\nstderr:\n{self.stderr[-3000:]}"

    def wait(self, within: float, what: str) -> int:
        """The exit code, failing the test if the process is still there after `within` seconds."""
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{what}: still running after {within:.0f} s\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Stage]]:
    """launch(name, params, uri, cwd, **paths) starts stages/<name>.py; whatever is left is killed after."""
    started: list[Stage] = []

    def start(name: str, params: Path, uri: str, cwd: Path, **paths: Path) -> Stage:
        argv = [PY, str(REPO / "stages" / f"{name}.py"), "--params", str(params)]
        for key, value in paths.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        stage = Stage(argv, cwd, uri, tmp_path / "logs" / f"{name}-{len(started)}")
        started.append(stage)
        return stage

    yield start
    for stage in started:
        stage.stop()


def doctor(uri: str, cwd: Path, logs: Path) -> Stage:
    stage = Stage([PY, "-m", "kdprune.cli", "doctor"], cwd, uri, logs)
    stage.wait(120, "kdprune doctor")
    return stage


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error(stage: Stage, *needles: str) -> str:
    """Exactly one `error:` line, holding every needle, and no traceback."""
    found = errors(stage.stderr)
    assert len(found) == 1, stage.tail()
    assert all(n in found[0] for n in needles), f"{needles} not in {found[0]!r}"
    assert "Traceback" not in stage.stderr + stage.stdout, stage.tail()
    return found[0]


def wait_until(check: Callable[[], T | None], within: float, what: str, stage: Stage | None = None) -> T:
    """Poll `check` until it returns something true; fail after `within` seconds or if `stage` exits."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if stage is not None and stage.proc.poll() is not None:
            pytest.fail(f"{what}: the stage exited {stage.proc.returncode} first\n{stage.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {within:.0f} s" + (f"\n{stage.tail()}" if stage else ""))
        time.sleep(0.25)


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def experiment_id(uri: str) -> str:
    exp = client(uri).get_experiment_by_name("kdprune")
    assert exp is not None, f"no experiment 'kdprune' in {uri}"
    return exp.experiment_id


def runs_of(uri: str, owner: str) -> list[Any]:
    """The runs a stage process opened (tagged with its identity)."""
    return client(uri).search_runs([experiment_id(uri)], f"tags.`pipeline.owner` = '{owner}'")


def training(uri: str, stage: Stage) -> Callable[[], str | None]:
    """A check: the id of the stage's run once it is RUNNING and has logged its first epoch."""

    def check() -> str | None:
        try:
            c = client(uri)
            exp = c.get_experiment_by_name("kdprune")
            runs = [] if exp is None else c.search_runs(
                [exp.experiment_id], f"tags.`pipeline.owner` = '{stage.owner}' and attributes.status = 'RUNNING'")
            if runs and c.get_metric_history(runs[0].info.run_id, "val_accuracy"):
                return runs[0].info.run_id
        except Exception:  # noqa: BLE001 - a store being written by the stage: asked again
            return None
        return None

    return check


def dead_pid() -> int:
    """The pid of a process that has come and gone."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def dead_identity() -> str:
    """The identity (host:pid:start) of a process that has exited."""
    from kdprune import procs

    proc = subprocess.Popen(["sleep", "60"])
    try:
        ident = procs.identity(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert ident is not None and procs.alive(ident) is False
    return ident


def test_a_process_that_has_exited_is_not_alive_before_its_parent_reaps_it() -> None:
    """A zombie (a killed `dvc` its caller has yet to wait for) owns nothing: a stage watching it ends."""
    from kdprune import procs

    proc = subprocess.Popen(["sleep", "60"])
    try:
        ident = procs.identity(proc.pid)
        assert procs.alive(ident) is True
        proc.kill()
        stat = Path(f"/proc/{proc.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
        assert procs.alive(ident) is False
        assert procs.identity(proc.pid) is None
    finally:
        proc.wait()


SLOW_SERVICE = """\
import socket, sys, time
time.sleep(1.0)  # imports that take a while
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(8)
while True:
    server.accept()[0].close()
"""


def _serving(path: Path) -> list[int]:
    """The processes whose command line names the socket `path` (the services started for it)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def test_a_service_s_key_covers_every_kdprune_module_it_runs() -> None:
    """A service (and the zygote it is forked from) is found by a hash of the code it runs: every kdprune
    module that what it answers with imports, at any depth (procs, files, errors and switches had been left
    out: a service forked from a zygote kept an edited procs.py's old code)."""
    import ast

    from kdprune import tracker

    package = Path(tracker.__file__).parent
    seen, todo = set(), ["tracker", "runs", "summary", "registry", "store"]  # zygote.preload's, and the service
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "kdprune":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdprune."):
                todo.append(node.module.split(".")[1])
    seen -= {"zygote", "forkserver"}  # the zygote's own key hashes zygote.py; forkserver's code only reads keys
    assert seen == set(tracker.SERVICE_MODULES)


def test_a_service_started_without_waiting_is_waited_for_and_never_started_twice(tmp_path: Path) -> None:
    """tracker.prestart's start (the first stage of a pipeline): whoever connects next waits for that
    process instead of starting a second; a process that ended unheard is replaced."""
    from kdprune import procs
    from kdprune.tracker import start_service

    (tmp_path / "slow_service.py").write_text(SLOW_SERVICE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    path = tmp_path / "s.sock"
    try:
        assert start_service(path, "slow_service", env, 60, wait=False) is None
        assert start_service(path, "slow_service", env, 60, wait=False) is None  # starting: left alone
        first = _serving(path)
        assert len(first) == 1
        start_service(path, "slow_service", env, 60).close()  # waited for, not started again
        assert _serving(path) == first
        assert procs.alive(path.with_suffix(".starting").read_text())

        os.kill(first[0], signal.SIGKILL)
        wait_until(lambda: not _serving(path), 30, "the killed service gone")
        path.unlink()
        start_service(path, "slow_service", env, 60).close()  # the one on record is gone: a new one
        assert len(_serving(path)) == 1 and _serving(path) != first
    finally:
        for pid in _serving(path):
            os.kill(pid, signal.SIGKILL)


def test_a_started_service_is_never_left_to_popen_del_while_it_runs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Python ignores an exception raised in a __del__, a KeyboardInterrupt too: a start that dropped its
    Popen while the service ran (Popen.__del__ runs warnings code) lost a Ctrl-C landing there, and the
    first stage of a run ran on after it (seen in tests/test_forkserver.py's Ctrl-C test, now and then).
    Every Popen.__del__ of a live process is recorded, through the start and a collection after it."""
    import gc

    from kdprune.tracker import start_service

    dropped: list[int] = []
    original = subprocess.Popen.__del__

    def recording(self: subprocess.Popen) -> None:
        if self.returncode is None and self.poll() is None:
            dropped.append(self.pid)
        original(self)

    monkeypatch.setattr(subprocess.Popen, "__del__", recording)
    (tmp_path / "slow_service.py").write_text(SLOW_SERVICE)
    path = tmp_path / "s.sock"
    try:
        start_service(path, "slow_service", dict(os.environ, PYTHONPATH=str(tmp_path)), 60).close()
        gc.collect()
        assert len(_serving(path)) == 1
        assert dropped == []
    finally:
        for pid in _serving(path):
            os.kill(pid, signal.SIGKILL)


def test_an_idle_service_retires_only_when_nobody_comes_and_leaves_nothing_to_wait_for(tmp_path: Path) -> None:
    """retire(): not while someone holds the lock start_service takes (a zygote's caller holds it while it
    waits for the fork, so retire must not wait for the lock) or waits to connect; when it may retire, its
    socket and its record of starting go under that lock, so a pipeline starting in that moment starts a
    new service at once instead of dialling this one or waiting for its process to end."""
    from filelock import FileLock

    from kdprune import procs, tracker

    path, starting = tmp_path / "s.sock", tmp_path / "s.starting"
    server = tracker.listen(path)
    starting.write_text(procs.identity(os.getpid()))
    try:
        with FileLock(str(path.with_suffix(".lock"))):
            assert tracker.retire(server, path) is False
        with tracker.dial(path):
            assert tracker.retire(server, path) is False
            server.accept()[0].close()
        assert path.exists() and starting.exists()
        assert tracker.retire(server, path) is True
        assert not path.exists() and not starting.exists()
    finally:
        server.close()


@pytest.mark.parametrize("serve", ["forkserver.serve(Path(sys.argv[1]))",
                                   "zygote._serve(tracker.listen(Path(sys.argv[1])), Path(sys.argv[1]))",
                                   "tracker.IDLE = 0.5; tracker.serve(tracker.listen(Path(sys.argv[1])))"],
                         ids=["fork server", "zygote", "tracking service"])
def test_an_idle_server_exits_and_takes_its_socket_and_its_record_with_it(serve: str, mlflow_store: str,
                                                                         tmp_path: Path) -> None:
    """After its idle time without a stage (here half a second: KDPRUNE_WARM_IDLE for the warm starts,
    the service's own IDLE; the fork server's later imports first) a fork server, a zygote or a tracking
    service retires: it exits, and its socket and the record of its start are gone."""
    path = tmp_path / "s.sock"
    path.with_suffix(".starting").write_text("a start on record")
    code = f"import sys; from pathlib import Path; from kdprune import forkserver, tracker, zygote; {serve}"
    server = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KDPRUNE_WARM_IDLE": "0.5"})
    assert server.returncode == 0, server.stderr
    assert not path.exists() and not path.with_suffix(".starting").exists()


def test_a_stopped_service_leaves_no_record_that_would_hold_up_the_next(mlflow_store: str) -> None:
    """While a process recorded as starting a service lives, start_service waits for it rather than start
    another; a service that stops takes its record with its socket, so the next stage's start does not
    wait for (or, unwaited, skip starting because of) a process on its way out."""
    from kdprune import tracker

    tracker.start().close(wait=True)
    path = tracker.service_socket(mlflow_store, "kdprune")
    assert path.exists() and path.with_suffix(".starting").exists()
    tracker.stop(mlflow_store, "kdprune")
    tracker.wait_gone([path])
    assert not path.exists() and not path.with_suffix(".starting").exists()


def test_a_new_sqlite_store_starts_from_an_empty_template_and_gets_its_own_locations(
        tmp_path: Path, services: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's schema migrations run once per MLflow version (the template); every new store is a copy,
    whose experiments MLflow and kdprune then create with that store's own artifact locations."""
    import mlflow

    from kdprune import store, tracker

    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        store.ensure_experiment()
        with contextlib.closing(sqlite3.connect(tmp_path / name / "mlflow.db")) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        found = {e.name: e.artifact_location for e in mlflow.MlflowClient(uri).search_experiments()}
        assert found == {"kdprune": (tmp_path / name / "mlartifacts").as_uri(),
                         "Default": str(tmp_path / name / "mlruns" / "0")}
    (template,) = tracker.service_dir().glob("mlflow-*-empty.db")
    assert template.name == f"mlflow-{mlflow.__version__}-empty.db"
    with contextlib.closing(sqlite3.connect(template)) as con:
        assert con.execute("SELECT count(*) FROM experiments").fetchone() == (0,)


def test_the_next_store_gets_a_service_forked_from_the_zygote_the_first_left_behind(
        tmp_path: Path, services: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second store's service costs a fork, not MLflow's import: it is a child of the zygote the first
    service left behind, with its own store, working directory and umask (the caller's); stopping every
    service stops the zygote too."""
    import mlflow

    from kdprune import procs, tracker, zygote

    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    params = write_params(tmp_path / "params.yaml")
    uris = {name: f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("one", "two")}
    envs = {name: tracker._service_env(uri, "kdprune") for name, uri in uris.items()}
    assert zygote.socket_path(envs["one"]) == zygote.socket_path(envs["two"])  # one zygote for both
    pids = {}
    try:
        for name, uri in uris.items():
            (tmp_path / name).mkdir()
            monkeypatch.chdir(tmp_path / name)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            umask = os.umask(0o027 if name == "two" else 0o022)
            try:
                run_stage("prepare", params, **stage_paths(tmp_path / name)["prepare"])
            finally:
                os.umask(umask)
            pids[name] = int(tracker.service_socket(uri, "kdprune").with_suffix(".starting").read_text()
                                 .split(":")[1])
            if name == "one":
                wait_until(lambda: zygote.socket_path(envs["one"]).exists(), 60, "the zygote listening")
        parent = {n: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                  for n, pid in pids.items()}
        assert Path(f"/proc/{parent['two']}/comm").read_text().strip() == "kdprune-zygote"
        assert Path(f"/proc/{parent['one']}/comm").read_text().strip() != "kdprune-zygote"  # started itself
        status = Path(f"/proc/{pids['two']}/status").read_text()
        assert "Umask:\t0027" in status
        assert os.readlink(f"/proc/{pids['two']}/cwd") == str(services)
        for name, uri in uris.items():
            (run,) = mlflow.MlflowClient(uri).search_runs(
                [mlflow.MlflowClient(uri).get_experiment_by_name("kdprune").experiment_id])
            assert run.info.status == "FINISHED" and run.data.tags["pipeline.stage"] == "prepare", name
        forked_from = procs.identity(parent["two"])
    finally:
        tracker.stop_all()
    wait_until(lambda: not procs.alive(forked_from), 30, "the zygote gone")
    assert not list(services.glob("*.sock"))


def test_a_relative_service_folder_is_where_the_services_listen_and_leave_their_zygote(
        tmp_path: Path, services: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KDPRUNE_SERVICE_DIR=svc names the folder under the stage's working folder, for the services too,
    which run in a folder of their own: the zygote an MLflow service leaves is where the next stage's
    start looks for it."""
    from kdprune import tracker, zygote

    monkeypatch.chdir(services)
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", "svc")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        connection = tracker.start()
        connection.call("ready")
        connection.close(wait=True)
        assert tracker.service_socket(uri, "kdprune").parent == services / "svc"
        as_started = {**tracker._service_env(uri, "kdprune"), "KDPRUNE_SERVICE_DIR": str(services / "svc")}
        found = wait_until(lambda: zygote.socket_path(as_started).exists() and zygote.socket_path(as_started), 60,
                           "the zygote listening")
        assert found.parent == services / "svc"
    finally:
        tracker.stop_all()


def staged_leftovers(*outputs: Path) -> list[str]:
    """`.<name>.<pid>.*` siblings of the outputs: a stage's staged directories and temporary files."""
    return sorted(p.name for out in outputs if out.parent.exists() for p in out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny prepared data, made once, in-process, into a module-wide sqlite store (now initialised)."""
    root = tmp_path_factory.mktemp("prepared")
    params = write_params(root / "params.yaml")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    paths = stage_paths(root)["prepare"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.chdir(root)
        run_stage("prepare", params, **paths)
    return {"root": root, "params": params, "uri": uri, "data": paths["out"]}


# -- a brand-new sqlite store ------------------------------------------------------------------------------


def test_four_stages_opening_a_brand_new_sqlite_store_at_once_all_log_into_it(
        tmp_path: Path, launch: Callable[..., Stage]) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    params = write_params(tmp_path / "params.yaml")
    stages = [launch("prepare", params, uri, tmp_path, raw=tmp_path / "data/raw", out=tmp_path / f"prepared{i}")
              for i in range(4)]
    for i, stage in enumerate(stages):
        assert stage.wait(240, f"prepare #{i}") == 0, stage.tail()

    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    c = client(uri)
    experiments = {e.name: e for e in c.search_experiments()}
    assert sorted(experiments) == ["Default", "kdprune"]
    assert experiments["kdprune"].tags.get("mlflow.experimentKind") == "custom_model_development"
    assert c.search_runs([experiments["Default"].experiment_id]) == []
    runs = c.search_runs([experiments["kdprune"].experiment_id], max_results=100)
    assert sorted(r.data.tags["pipeline.owner"] for r in runs) == sorted(s.owner for s in stages)
    assert [r.info.status for r in runs] == ["FINISHED"] * 4
    assert all(r.data.tags["pipeline.stage"] == "prepare" for r in runs)
    assert all((tmp_path / f"prepared{i}" / "manifest.json").is_file() for i in range(4))


def _waiting_on(worker: threading.Thread, lock_file: Path) -> bool:
    """Whether `worker` is inside filelock's acquire of `lock_file` (read off its live stack)."""
    frame = sys._current_frames().get(worker.ident)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if getattr(owner, "lock_file", None) == str(lock_file):
            return True
        frame = frame.f_back
    return False


def test_the_store_lock_sits_beside_the_database_not_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage started from another directory (a DVC experiment's copy) waits for the lock of the store it opens."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported up front: only the lock may hold it back)
    from filelock import FileLock

    from kdprune.store import ensure_experiment

    home, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    db, lock_file = home / "mlflow.db", home / ".mlflow.lock"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(elsewhere)
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["id"] = ensure_experiment()
        except Exception as e:  # noqa: BLE001 - handed to the test's thread
            result["error"] = e

    worker = threading.Thread(target=connect, daemon=True)
    with FileLock(str(lock_file), timeout=10):
        worker.start()
        wait_until(lambda: _waiting_on(worker, lock_file) or not worker.is_alive(), 60,
                   "ensure_experiment reaching the lock beside the database")
        assert worker.is_alive() and not db.exists(), "the store was opened while its lock was held"
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert "error" not in result, result.get("error")
    assert client(f"sqlite:///{db}").get_experiment_by_name("kdprune").experiment_id == result["id"]
    assert not (elsewhere / ".mlflow.lock").exists()


# -- a tracking server that is down ------------------------------------------------------------------------


DOWN = ["http://127.0.0.1:9", "postgresql://mlflow@127.0.0.1:9/mlflow"]  # nothing listens on port 9 (discard)


def test_a_server_that_is_down_stops_the_stage_before_training_naming_it(
        prepared: dict[str, Any], tmp_path: Path, launch: Callable[..., Stage]) -> None:
    """(A database server that is down is found by the same check: doctor's and report's test below.)"""
    uri = DOWN[0]
    out, plots = tmp_path / "teacher", tmp_path / "plots" / "train_teacher.csv"
    stage = launch("train_teacher", prepared["params"], uri, tmp_path, data=prepared["data"], out=out, plots=plots)
    assert stage.wait(60, "train_teacher against a server that is down") == 2, stage.tail()
    assert_one_error(stage, uri)
    assert "epoch" not in stage.stdout + stage.stderr  # refused before training, not after
    assert not out.exists() and not plots.exists()
    assert staged_leftovers(out, plots) == []


@pytest.mark.parametrize("uri", DOWN)
@pytest.mark.parametrize("command", [["doctor"], ["report"]])
def test_kdprune_doctor_and_report_against_a_store_that_is_down_name_it_in_seconds(
        uri: str, command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A tracking server, or a database server: MLflow retried opening a PostgreSQL store that was down for
    10 minutes (a stage's stage.run makes the same check before its work)."""
    from kdprune import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(command)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("kdprune: error: MLflow tracking "), err
    assert err.endswith(f"{uri} is not answering (Connection refused)\n") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


# -- a real tracking server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 in its own process group, over a sqlite store and an artifact folder;
    killed and started again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts, self.log = root / "srv-artifacts", root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log.open("a") as f:
            self.proc = subprocess.Popen(
                [PY, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                cwd=self.root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._healthy, 120, f"mlflow server on {self.uri} answering /health")

    def ensure_up(self) -> None:
        """Start it again if a test that killed it did not get to restart it."""
        if self.proc is None or self.proc.poll() is not None or not self._healthy_quietly():
            self.stop()
            self.start()

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL its whole process group (the CLI and its uvicorn worker), as a crash would."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)
        wait_until(lambda: not self._healthy_quietly(), 60, f"{self.uri} going quiet")

    def stop(self) -> None:
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._signal_group(signal.SIGKILL)  # a worker that outlived its parent

    def _healthy_quietly(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)  # start_new_session: the group is the server's pid


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the module (a test that kills it starts it again)."""
    srv = Server(tmp_path_factory.mktemp("server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def test_stages_log_through_a_real_server_and_what_it_prints_corrupts_nothing(
        server: Server, tmp_path: Path, launch: Callable[..., Stage]) -> None:
    server.ensure_up()
    uri = server.uri
    params = write_params(tmp_path / "params.yaml")
    paths = stage_paths(tmp_path)
    done = {}
    for name in ("prepare", "train_teacher"):
        done[name] = launch(name, params, uri, tmp_path, **paths[name])
        assert done[name].wait(240, name) == 0, done[name].tail()
    # MLflow prints "View run ... at ..." to stdout when a run on a server ends: never into the stage's replies
    assert all("View run" not in stage.stdout for stage in done.values())

    c = client(uri)
    runs = {name: runs_of(uri, stage.owner) for name, stage in done.items()}
    assert [len(r) for r in runs.values()] == [1, 1]
    prepare, teacher = runs["prepare"][0], runs["train_teacher"][0]
    assert (prepare.info.status, teacher.info.status) == ("FINISHED", "FINISHED")
    assert teacher.data.tags["pipeline.upstream.prepare"] == prepare.info.run_id
    epochs = yaml.safe_load(params.read_text())["teacher"]["epochs"]
    assert sorted(m.step for m in c.get_metric_history(teacher.info.run_id, "val_accuracy")) == \
        list(range(1, epochs + 1))
    models = c.search_logged_models([experiment_id(uri)],
                                    filter_string=f"source_run_id = '{teacher.info.run_id}'")
    assert [m.name for m in models] == ["teacher"]
    # the model went to the server's artifact store over HTTP, not into a local folder
    assert list(server.artifacts.rglob("MLmodel"))
    assert not (tmp_path / "mlartifacts").exists()


def test_acceptance_a_server_killed_mid_training_fails_the_stage_cleanly_and_its_run_is_closed_after_restart(
        server: Server, prepared: dict[str, Any], tmp_path: Path, launch: Callable[..., Stage]) -> None:
    server.ensure_up()
    uri = server.uri
    epochs = 400  # far more than it trains before it learns of the dead server: still training when it fails
    params = write_params(tmp_path / "params.yaml", teacher={"epochs": epochs})
    out, plots = tmp_path / "models" / "teacher", tmp_path / "plots" / "train_teacher.csv"
    stage = launch("train_teacher", params, uri, tmp_path, data=prepared["data"], out=out, plots=plots)
    run_id = wait_until(training(uri, stage), 180, "train_teacher logging its first epoch", stage)

    server.kill()
    assert stage.wait(60, "train_teacher after its server was killed") == 2, stage.tail()
    assert_one_error(stage, uri)
    assert f"epoch {epochs}/{epochs}" not in stage.stderr, "the stage trained on to the end against a dead server"
    assert not out.exists() and not plots.exists()
    assert staged_leftovers(out, plots) == []

    server.start()  # same port, same store
    closed = doctor(uri, tmp_path, tmp_path / "logs" / "doctor")
    assert closed.proc.returncode == 0, closed.tail()
    assert run_id in closed.stdout
    assert client(uri).get_run(run_id).info.status in ("FAILED", "KILLED")
    assert client(uri).search_runs([experiment_id(uri)], "attributes.status = 'RUNNING'") == []


class ChattyOutput(AssertionError):
    """A command whose output holds more than the lines it promises."""


def test_doctor_against_a_server_prints_one_line_per_run_it_closed(server: Server, tmp_path: Path) -> None:
    from kdprune import procs

    server.ensure_up()
    uri = server.uri
    c = client(uri)
    exp = c.get_experiment_by_name("kdprune")
    exp_id = exp.experiment_id if exp else c.create_experiment("kdprune")
    tags = {"pipeline.stage": "prune", "pipeline.kind": "stage", "pipeline.host": socket.gethostname()}
    dead = c.create_run(exp_id, tags={**tags, "pipeline.owner": dead_identity()}).info.run_id
    alive = c.create_run(exp_id, tags={**tags, "pipeline.owner": procs.identity()}).info.run_id
    try:
        result = doctor(uri, tmp_path, tmp_path / "logs" / "doctor")
        assert result.proc.returncode == 0, result.tail()
        assert (c.get_run(dead).info.status, c.get_run(alive).info.status) == ("KILLED", "RUNNING")
        assert any(dead in line and "KILLED" in line for line in result.stdout.splitlines())
    finally:
        c.set_terminated(alive, "KILLED")  # the acceptance test wants no RUNNING run on this server
    lines = result.stdout.splitlines()
    if len(lines) != 1:
        raise ChattyOutput(f"{len(lines)} lines for one closed run: {lines}")


# -- interrupted and killed stages -------------------------------------------------------------------------


@pytest.fixture
def old_teacher(tmp_path: Path) -> dict[str, Any]:
    """An output folder holding a previous teacher (a sentinel file), its bytes, and a params file with
    enough epochs that the stage is still training when it is signalled."""
    out = tmp_path / "models" / "teacher"
    out.mkdir(parents=True)
    (out / "sentinel.txt").write_text("the previous teacher\n")
    return {"out": out, "plots": tmp_path / "plots" / "train_teacher.csv", "before": tree_bytes(out),
            "params": write_params(tmp_path / "params.yaml", teacher={"epochs": 200})}


def test_sigterm_mid_training_exits_130_kills_the_run_and_writes_nothing(
        prepared: dict[str, Any], old_teacher: dict[str, Any], tmp_path: Path, launch: Callable[..., Stage]) -> None:
    uri, out, plots = prepared["uri"], old_teacher["out"], old_teacher["plots"]
    stage = launch("train_teacher", old_teacher["params"], uri, tmp_path, data=prepared["data"], out=out, plots=plots)
    run_id = wait_until(training(uri, stage), 180, "train_teacher logging its first epoch", stage)
    stage.proc.send_signal(signal.SIGTERM)
    assert stage.wait(120, "train_teacher after SIGTERM") == 130, stage.tail()
    assert errors(stage.stderr) == ["error: interrupted; no output written"], stage.tail()
    assert "Traceback" not in stage.stderr
    assert client(uri).get_run(run_id).info.status == "KILLED"  # closed before the stage exited
    assert tree_bytes(out) == old_teacher["before"]
    assert not plots.exists()
    assert staged_leftovers(out, plots) == []


def test_sigkill_mid_training_leaves_the_tracker_to_close_the_run_as_killed(
        prepared: dict[str, Any], old_teacher: dict[str, Any], tmp_path: Path, launch: Callable[..., Stage]) -> None:
    """SIGKILL gives the stage no chance to clean up: its tracking end (helper or service) sees its
    connection close without a `finish`, and closes the run as KILLED."""
    uri, out, plots = prepared["uri"], old_teacher["out"], old_teacher["plots"]
    stage = launch("train_teacher", old_teacher["params"], uri, tmp_path, data=prepared["data"], out=out, plots=plots)
    run_id = wait_until(training(uri, stage), 180, "train_teacher logging its first epoch", stage)
    stage.proc.kill()
    assert stage.wait(60, "train_teacher after SIGKILL") == -signal.SIGKILL

    def closed() -> str | None:
        with contextlib.suppress(Exception):
            status = client(uri).get_run(run_id).info.status
            return status if status != "RUNNING" else None
        return None

    assert wait_until(closed, 60, "the tracker closing the run") == "KILLED"
    assert tree_bytes(out) == old_teacher["before"]
    assert not plots.exists()


def test_the_next_run_of_a_stage_removes_the_staged_folder_a_killed_one_left(
        prepared: dict[str, Any], tmp_path: Path, launch: Callable[..., Stage]) -> None:
    out, plots = tmp_path / "models" / "teacher", tmp_path / "plots" / "train_teacher.csv"
    dead = dead_pid()
    stale_dir, stale_old = out.parent / f".teacher.{dead}.k2x9q.tmp", out.parent / f".teacher.{dead}.old"
    live = out.parent / f".teacher.{os.getpid()}.a7b3c.tmp"  # its maker still runs: not ours to remove
    for folder in (stale_dir, stale_old, live):
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"half a teacher")
    stage = launch("train_teacher", prepared["params"], prepared["uri"], tmp_path, data=prepared["data"],
                   out=out, plots=plots)
    assert stage.wait(240, "train_teacher") == 0, stage.tail()
    assert not stale_dir.exists() and not stale_old.exists()
    assert live.is_dir()
    assert (out / "manifest.json").is_file()
    assert staged_leftovers(out) == [live.name]
    assert [r.info.status for r in runs_of(prepared["uri"], stage.owner)] == ["FINISHED"]


# -- runs left open ----------------------------------------------------------------------------------------


def test_doctor_closes_runs_left_open_by_dead_processes_and_leaves_live_ones(
        tmp_path: Path, mlflow_store: str) -> None:
    from kdprune import procs, store

    uri = mlflow_store
    exp_id = store.ensure_experiment()
    c, host = client(uri), socket.gethostname()

    def running(stage: str, **tags: str) -> str:
        return c.create_run(exp_id, tags={"pipeline.stage": stage, "pipeline.kind": "stage", **tags}).info.run_id

    dead = running("train_teacher", **{"pipeline.host": host, "pipeline.owner": dead_identity()})
    alive = running("train_student", **{"pipeline.host": host, "pipeline.owner": procs.identity()})
    foreign = running("score", **{"pipeline.host": "another-host", "pipeline.owner": "another-host:4242:1"})
    unreachable = running("prune", **{"pipeline.host": host})  # its stage recorded it when the store was lost
    pending = tmp_path / ".kdprune" / "pending"
    pending.mkdir(parents=True)
    (pending / f"{unreachable}.json").write_text(json.dumps({"uri": uri, "run_id": unreachable, "status": "FAILED"}))

    result = doctor(uri, tmp_path, tmp_path / "logs" / "doctor")
    assert result.proc.returncode == 0, result.tail()
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.tail()
    assert sum(dead in line and "KILLED" in line for line in lines) == 1
    assert sum(unreachable in line and "FAILED" in line for line in lines) == 1
    status = {run_id: c.get_run(run_id).info.status for run_id in (dead, alive, foreign, unreachable)}
    assert status == {dead: "KILLED", alive: "RUNNING", foreign: "RUNNING", unreachable: "FAILED"}
    assert list(pending.iterdir()) == []


def test_the_service_makes_one_mlflow_call_at_a_time(mlflow_store, tmp_path):
    """MLflow's client keeps process-wide state it does not guard for threads (Model.log patches os.environ's
    class to record what it reads, then iterates the record): calls from stages connected at once are
    made one by one."""
    from kdprune import tracker

    service = tracker.Service(tmp_path / "s.sock")
    count, most, asked, lock, everyone = [0], [0], [0], threading.Lock(), threading.Event()

    def op(**args: Any) -> None:  # the first call is held until all three are asked, however late their
        with lock:               # threads started; by the end of it the others are in too, unless the
            count[0] += 1        # service takes turns
            most[0] = max(most[0], count[0])
        everyone.wait(60)
        time.sleep(0.3)
        with lock:
            count[0] -= 1

    def ask(i: int) -> None:
        with lock:
            asked[0] += 1
            if asked[0] == 3:
                everyone.set()
        answers.append(service.answer({"id": i, "op": "log_epoch", "args": {"step": 0}}))

    service.ops["log_epoch"] = op
    answers: list[dict] = []
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.before_model_logging()  # no warm-up from here on: the warm thread ends once the store is open
    service.between.set()
    service.warm.join()
    assert sorted(a["id"] for a in answers) == [0, 1, 2] and all("error" not in a for a in answers)
    assert most[0] == 1


def test_the_first_stage_returns_once_the_service_it_started_answers_and_that_is_no_stage(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """await_ready (the process of a pipeline's first stage, which started the service beside the fork
    server) returns once the service can answer, not before: the next stage's first call then waits on
    nothing. Its question is no stage's session, nor is the next stage's look whether the service listens
    (prestart): the warm-up, which slows a stage's calls, still waits for the first stage to go."""
    from kdprune import runs, tracker

    monkeypatch.setattr(runs, "warm_up", lambda: None)
    path = tmp_path / "s.sock"
    server = tracker.listen(path)
    service = tracker.Service(path)
    serving = threading.Thread(target=service.serve, args=(server,), daemon=True)
    serving.start()
    waited = threading.Thread(target=tracker.await_ready, args=(path, 120))
    try:
        with service.calls:  # the service still busy (MLflow's store being opened)
            waited.start()
            waited.join(1.0)
            assert waited.is_alive()  # still waiting for an answer
        waited.join(60)
        assert not waited.is_alive()
        wait_until(lambda: service.sessions == 0, 60, "await_ready's session over")
        assert not service.between.is_set()  # a question whether it is ready, not a stage that has gone
        looked, session = threading.Event(), service.session

        def counted(conn: socket.socket) -> None:
            session(conn)
            looked.set()

        service.session = counted
        tracker.dial(path).close()  # nor is a look whether it listens (the next stage's prestart)
        assert looked.wait(60)
        assert not service.between.is_set()
        with tracker.dial(path) as sock, sock.makefile("rb") as answers:  # a stage, gone
            sock.sendall(b'{"id": 1, "op": "finish", "args": {"status": "FINISHED"}}\n')  # (no run open)
            answers.readline()
        wait_until(service.between.is_set, 60, "the warm-up let go once a stage has gone")
    finally:
        service.stopping = True
        serving.join(60)


def test_prestart_starts_the_service_only_where_none_listens_and_only_then_gives_one_to_wait_for(
        mlflow_store: str) -> None:
    """Every stage of a pipeline prestarts its store's service before it hands itself over (the first; after
    a pause, the first whose fork server is still warm): where one listens, nothing is started and the
    stage has nothing to await; where none does, one is started and the stage waits for it to answer."""
    from kdprune import tracker

    path = tracker.service_socket(mlflow_store, "kdprune")
    started = path.with_suffix(".starting")  # the identity of the process started for it
    assert tracker.prestart() == path and started.exists()  # none listened: one started, not waited for
    tracker.await_ready(path, 120)
    assert path.exists()
    first = started.read_text()
    assert tracker.prestart() is None  # one listens: nothing to start, nothing to await
    assert started.read_text() == first


def test_await_ready_gives_up_quietly_where_no_service_comes(tmp_path: Path) -> None:
    """A service that never came up is reported by the first stage that connects, not by the one that
    started it: await_ready raises nothing, and returns at once when the process started for it has
    ended, or after its timeout while that process lives on without listening."""
    from kdprune import procs, tracker

    path = tmp_path / "s.sock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.with_suffix(".starting").write_text(procs.identity(os.getpid()).rsplit(":", 2)[0] + f":{dead.pid}:1")
    start = time.monotonic()
    tracker.await_ready(path, timeout=60)
    assert time.monotonic() - start < 30  # not the timeout: the process it waited for is gone

    path.with_suffix(".starting").write_text(procs.identity(os.getpid()))  # alive, never listening
    start = time.monotonic()
    tracker.await_ready(path, timeout=1.0)
    assert time.monotonic() - start >= 1.0


def test_model_logging_is_warmed_up_between_stages_and_never_beside_a_model_being_logged(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's warm-up of model logging (0.6-0.9 s of CPU, most of it holding the GIL) made the first
    stage's calls 3-7 times slower beside it: it starts once the first stage has gone. A log_model waits for
    a warm-up under way (Model.log records the os.environ reads made meanwhile, in any thread, then iterates
    the record); one that comes before the warm-up begins skips it."""
    from kdprune import runs, tracker

    started, release = threading.Event(), threading.Event()

    def warm_up() -> None:
        started.set()
        release.wait(120)

    monkeypatch.setattr(runs, "warm_up", warm_up)
    answers: list[dict] = []

    def ask(service: tracker.Service, op: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.append(service.answer({"id": 1, "op": op, "args": {}})))
        thread.start()
        return thread

    def a_stage_comes_and_goes(service: tracker.Service) -> None:
        ours, theirs = socket.socketpair()
        with ours:
            ours.sendall(b'{"id": 1, "op": "log_epoch", "args": {}}\n')
            ours.shutdown(socket.SHUT_WR)
            service.session(theirs)

    def serving(service: tracker.Service) -> tracker.Service:  # log_model says whether a warm-up was under way
        service.ops["log_epoch"] = lambda **args: "done"
        service.ops["log_model"] = lambda **args: "beside a warm-up" if started.is_set() and not release.is_set() \
            else "done"
        return service

    service = serving(tracker.Service(tmp_path / "a.sock"))
    try:
        ask(service, "log_epoch").join(60)  # the store opened first (seconds on a busy machine)
        assert answers == [{"id": 1, "ok": "done"}]
        assert not started.wait(0.5) and (service.warmth, service.between.is_set()) == ("pending", False)
        a_stage_comes_and_goes(service)  # (above: a stage is being served, no warm-up yet)
        assert started.wait(60)
        logging_model = ask(service, "log_model")
        logging_model.join(0.5)
        assert len(answers) == 1  # log_model waits for the warm-up under way
    finally:
        release.set()
    logging_model.join(120)
    assert answers[1:] == [{"id": 1, "ok": "done"}]

    started.clear()
    service = serving(tracker.Service(tmp_path / "b.sock"))
    ask(service, "log_model").join(60)  # before any warm-up: answered at once, and the warm-up skipped
    assert answers[2:] == [{"id": 1, "ok": "done"}]
    a_stage_comes_and_goes(service)
    service.warm.join(60)
    assert not service.warm.is_alive() and not started.is_set()


def test_a_call_that_fails_on_a_bug_is_one_line_to_the_stage_and_a_traceback_in_the_service_log(mlflow_store):
    """A failure that is neither ours nor MLflow's (here an argument the op does not take) reaches the
    stage as one line, and leaves the traceback it needs to be found in the service's log."""
    from kdprune import store, tracker
    from kdprune.errors import TrackingError

    connection = tracker.start()
    try:
        with pytest.raises(TrackingError, match="unexpected keyword argument 'bogus'"):
            connection.call("log_epoch", bogus=1)
    finally:
        connection.close(wait=True)
    log = tracker.service_socket(mlflow_store, store.experiment_name()).with_suffix(".log").read_text()
    assert "log_epoch failed:" in log
    assert "Traceback (most recent call last)" in log.split("log_epoch failed:")[1]


def test_an_open_that_fails_after_its_run_is_created_closes_it_failed_and_nothing_logs_into_a_stray_run(
        services: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A param MLflow refuses fails `open` after the run was created. That run had stayed RUNNING, and the
    stage's next messages went through MLflow's fluent calls, which started a run of their own to log into."""
    from kdprune import tracker
    from kdprune.errors import TrackingError

    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    connection = tracker.start()
    try:
        with pytest.raises(TrackingError, match="bad key!"):
            connection.call("open", stage="train_teacher", kind="stage", name="refused", params={"bad key!": 1},
                            inputs={}, owner=None, execution=None)
        for op, args in (("log_epoch", {"step": 0, "metrics": {"loss": 1.0}}),
                         ("set_tags", {"tags": {"pipeline.note": "x"}})):
            with pytest.raises(TrackingError, match="no run is open"):
                connection.call(op, **args)
        assert connection.call("finish", status="FINISHED") is None
    finally:
        connection.close(wait=True)
    runs = client(mlflow_store).search_runs([experiment_id(mlflow_store)])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("refused", "FAILED")]


def test_doctor_drops_a_pending_record_of_a_run_the_store_no_longer_has_or_that_cannot_be_read(
        tmp_path: Path, mlflow_store: str) -> None:
    """An empty record (a disk that filled while it was written) had stopped doctor with a traceback, and
    every tracked stage with one line naming no file; records are now written atomically too."""
    from kdprune import store

    uri = mlflow_store
    c = client(uri)
    real = c.create_run(store.ensure_experiment(), tags={"pipeline.stage": "prune"}).info.run_id
    gone = "0" * 32  # sorts first: read before the real one
    pending = tmp_path / ".kdprune" / "pending"
    pending.mkdir(parents=True)
    for run_id in (gone, real):
        (pending / f"{run_id}.json").write_text(json.dumps({"uri": uri, "run_id": run_id, "status": "FAILED"}))
    (pending / ("1" * 32 + ".json")).write_text("")

    result = doctor(uri, tmp_path, tmp_path / "logs" / "doctor")
    assert "Traceback" not in result.stderr, result.tail()
    assert result.proc.returncode == 0, result.tail()
    assert c.get_run(real).info.status == "FAILED"
    assert list(pending.iterdir()) == []
    assert f"dropped the unreadable record {pending / ('1' * 32 + '.json')} (JSONDecodeError: " in result.stdout


def test_a_stage_that_fails_after_a_message_of_its_failed_closes_its_run_failed(
        services: Path, mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (services first: torn down after mlflow_store, whose stop of the service would make its folder again)
    """The earlier message's error (an artifact that was not there), read as the failed stage sent its
    `finish`, had kept that `finish` unsent: the service closed the run KILLED, as for a stage killed."""
    from kdprune import stage
    from kdprune.params import load_params

    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    p = load_params(write_params(tmp_path / "params.yaml"))
    with pytest.raises(OSError, match="No space left"):
        with stage.run("train_teacher", p, ("seed",), {}, {tmp_path / "out": "folder"}) as run:
            run.log_artifact(tmp_path / "absent.png")
            wait_until(lambda: b'"error"' in run.tracker.sock.recv(1 << 16, socket.MSG_PEEK), 120,
                       "the artifact's error, come back unread")  # (after the open's answer)
            raise OSError(28, "No space left on device")
    runs = client(mlflow_store).search_runs([experiment_id(mlflow_store)])
    assert [(r.data.tags["pipeline.stage"], r.info.status) for r in runs] == [("train_teacher", "FAILED")]


def test_doctor_on_an_experiment_the_store_does_not_have_says_so_and_creates_nothing(
        tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`MLFLOW_EXPERIMENT_NAME=kdprnue kdprune doctor` had answered "no run left open" and added the
    experiment `kdprnue` to the store (a team's server too); doctor only reads and closes runs."""
    from kdprune import cli, store

    store.ensure_experiment()
    before = sorted(e.name for e in client(mlflow_store).search_experiments())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kdprnue")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["doctor"])
    assert (e.value.code, capsys.readouterr().err) == (
        2, f"kdprune: error: {mlflow_store} has no experiment 'kdprnue' (MLFLOW_EXPERIMENT_NAME): no run to close\n")
    assert sorted(e.name for e in client(mlflow_store).search_experiments()) == before


# -- one line per expected failure -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(prepared: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher folder as train_teacher writes it (model.pt, spec.json, manifest.json), untrained."""
    from kdprune import manifest
    from kdprune.checkpoints import save_model
    from kdprune.data import load_meta
    from kdprune.models import build_model
    from kdprune.params import load_params

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    out.mkdir()
    meta = load_meta(prepared["data"])
    spec = load_params(prepared["params"]).teacher.spec(meta["in_channels"], meta["image_size"], meta["num_classes"])
    save_model(out, build_model(spec), spec)
    manifest.write(out, "train_teacher", {"data": manifest.fingerprint(prepared["data"])})
    return out


def tampered(src: Path, dst: Path, name: str, edit: Callable[[str], str]) -> Path:
    """A copy of a stage's folder with one JSON file edited and its manifest written again, so the
    reader gets past the manifest check to the file itself."""
    from kdprune import manifest

    shutil.copytree(src, dst)
    (dst / name).write_text(edit((dst / name).read_text()))
    record = json.loads((dst / "manifest.json").read_text())
    manifest.write(dst, record["stage"], record["inputs"])
    return dst


def _first_unit(spec_text: str) -> str:
    from kdprune.models import build_model, units

    return units(build_model(json.loads(spec_text)))[0].name


def with_width(width: int) -> Callable[[str], str]:
    def edit(text: str) -> str:
        spec = json.loads(text)
        return json.dumps({**spec, "widths": {_first_unit(text): width}})

    return edit


BROKEN_INPUTS = {  # case -> (folder, file, edit, what the error line names besides the file)
    "malformed meta.json": ("data", "meta.json", lambda t: t[: len(t) // 2], "cannot read JSON"),
    "malformed spec.json": ("teacher", "spec.json", lambda t: "{'arch': cnn", "cannot read JSON"),
    "negative width in spec.json": ("teacher", "spec.json", with_width(-3), "widths."),
    "width 10**10 in spec.json": ("teacher", "spec.json", with_width(10**10), "widths."),
}


@pytest.mark.parametrize("case", list(BROKEN_INPUTS))
def test_a_broken_input_file_stops_the_stage_with_one_line_naming_it(
        case: str, prepared: dict[str, Any], teacher_dir: Path, tmp_path: Path, launch: Callable[..., Stage]) -> None:
    folder, name, edit, named = BROKEN_INPUTS[case]
    inputs = {"data": prepared["data"], "teacher": teacher_dir}
    inputs[folder] = tampered(inputs[folder], tmp_path / folder, name, edit)
    out = tmp_path / "soft_labels"
    stage = launch("soft_labels", prepared["params"], prepared["uri"], tmp_path, out=out, **inputs)
    assert stage.wait(240, f"soft_labels on a {case}") == 2, stage.tail()
    assert_one_error(stage, str(inputs[folder] / name), named)
    assert not out.exists()
    assert staged_leftovers(out) == []
    assert [r.info.status for r in runs_of(prepared["uri"], stage.owner)] == ["FAILED"]


def _can_drop_dac_override() -> bool:
    return shutil.which("setpriv") is not None and subprocess.run(
        ["setpriv", "--bounding-set=-dac_override", "--", "true"], capture_output=True).returncode == 0


class MixedOutputs(AssertionError):
    """A failed stage that replaced some of its outputs and not others."""


def test_an_output_under_a_file_stops_the_stage_before_its_work_with_one_line_and_leaves_its_other_outputs(
        prepared: dict[str, Any], tmp_path: Path, launch: Callable[..., Stage]) -> None:
    """Found before training, as a bad param is, so no run is opened (it had trained, then failed writing
    its curve, its run FAILED)."""
    out = tmp_path / "models" / "teacher"
    out.mkdir(parents=True)
    (out / "sentinel.txt").write_text("the previous teacher\n")
    before = tree_bytes(out)
    blocker = tmp_path / "plots"
    blocker.write_text("a file where a folder should be\n")
    stage = launch("train_teacher", prepared["params"], prepared["uri"], tmp_path, data=prepared["data"],
                   out=out, plots=blocker / "train_teacher.csv")
    assert stage.wait(240, "train_teacher writing under a file") == 2, stage.tail()
    assert_one_error(stage, str(blocker))
    assert "epoch" not in stage.stdout + stage.stderr
    assert blocker.read_text() == "a file where a folder should be\n"
    assert staged_leftovers(out) == []
    assert runs_of(prepared["uri"], stage.owner) == []
    if tree_bytes(out) != before:
        raise MixedOutputs(f"the stage failed, yet replaced {out}: {sorted(p.name for p in out.iterdir())}")


def test_a_read_only_output_folder_stops_the_stage_with_one_line(
        prepared: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root writes through any mode bits; without CAP_DAC_OVERRIDE (dropped with setpriv) it is held to them.
    The stage runs in its own process: under setpriv it would start a fork server of its own (keyed by its
    privileges: tests/test_forkserver.py), 7 s of CPU for nothing this test checks."""
    monkeypatch.setenv("KDPRUNE_FORKSERVER", "off")
    parent = tmp_path / "read-only"
    parent.mkdir()
    out = parent / "prepared"
    argv = [PY, str(REPO / "stages" / "prepare.py"), "--params", str(prepared["params"]),
            "--raw", str(tmp_path / "raw"), "--out", str(out)]
    if os.geteuid() == 0:
        if not _can_drop_dac_override():
            pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no usable setpriv): "
                        "a read-only folder cannot be made")
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *argv]
    parent.chmod(0o555)
    try:
        stage = Stage(argv, tmp_path, prepared["uri"], tmp_path / "logs")
        try:
            assert stage.wait(240, "prepare into a read-only folder") == 2, stage.tail()
        finally:
            stage.stop()
    finally:
        parent.chmod(0o755)
    assert_one_error(stage, str(parent), "Permission denied")
    assert list(parent.iterdir()) == []


def test_device_cuda_on_a_machine_without_it_is_refused_at_validate(tmp_path: Path,
                                                                     launch: Callable[..., Stage]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device cuda is valid here")
    params = write_params(tmp_path / "params.yaml", device="cuda")
    marker = tmp_path / "artifacts" / "params.ok"
    stage = launch("validate", params, "sqlite:///unused.db", tmp_path, out=marker)
    assert stage.wait(120, "validate with device cuda") == 2, stage.tail()
    assert_one_error(stage, str(params), "device: cuda")
    assert not marker.exists()
