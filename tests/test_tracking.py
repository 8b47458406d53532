"""MLflow tracking under stress: a brand-new store opened by many stages at once, a server that is down,
a real server over HTTP, and stages that fail or are killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import REPO, run_stage, stage_env, stage_paths, tree_bytes, write_params

PY = sys.executable


def stage_cmd(name: str, params: Path, **paths: Path) -> list[str]:
    argv = [PY, str(REPO / "stages" / f"{name}.py"), "--params", str(params)]
    for key, value in paths.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def stop(proc: subprocess.Popen) -> None:
    """Kill a stage subprocess this test started, if it is still there."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny prepared data, made in-process under its own (now initialised) sqlite store."""
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


# -- a brand-new sqlite store -----------------------------------------------------------------------------


WRITER = """
import sys
from pathlib import Path
from kdprune.tracking import log_epoch, stage_run, write_run_record

with stage_run("writer", {"writer": sys.argv[1]}) as run:
    log_epoch(1, {"written": 1.0})
    write_run_record(Path(sys.argv[2]), run)
"""


def test_concurrent_stages_share_a_brand_new_sqlite_store(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert not db.exists()
    outs = [tmp_path / f"out{i}" for i in range(4)]
    logs = [tmp_path / f"writer{i}.log" for i in range(4)]
    procs = []
    try:
        for i, (out, log) in enumerate(zip(outs, logs)):
            with log.open("w") as f:
                procs.append(subprocess.Popen([PY, "-c", WRITER, str(i), str(out)], cwd=tmp_path, env=stage_env(uri),
                                              stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:
            stop(p)
    assert codes == [0] * 4, "\n".join(log.read_text()[-1500:] for log in logs)

    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    c = client(uri)
    experiments = {e.name: e.experiment_id for e in c.search_experiments()}
    assert sorted(experiments) == ["Default", "kdprune"]
    assert c.search_runs([experiments["Default"]]) == []
    runs = c.search_runs([experiments["kdprune"]], max_results=100)
    assert len(runs) == 4
    assert [r.info.status for r in runs] == ["FINISHED"] * 4
    recorded = [json.loads((out / "mlflow_run.json").read_text())["run_id"] for out in outs]
    assert len(set(recorded)) == 4
    assert set(recorded) == {r.info.run_id for r in runs}
    assert sorted(r.data.params["writer"] for r in runs) == ["0", "1", "2", "3"]
    assert all(r.data.metrics["written"] == 1.0 for r in runs)


def test_store_lock_sits_beside_the_database_not_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage started from another directory must wait for the lock of the store it opens."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported up front: only the lock may hold it back)
    from filelock import FileLock

    from kdprune.tracking import ensure_experiment

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    db = store / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(elsewhere)
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["id"] = ensure_experiment()
        except Exception as e:  # handed to the test thread
            result["error"] = e

    lock = FileLock(str(store / ".mlflow.lock"))
    lock.acquire(timeout=5)
    worker = threading.Thread(target=connect, daemon=True)
    try:
        worker.start()
        worker.join(timeout=2)
        waited = worker.is_alive() and not db.exists()
    finally:
        lock.release()
    worker.join(timeout=60)
    assert waited, "ensure_experiment opened the store without taking the lock beside it"
    assert "error" not in result, result.get("error")
    assert client(f"sqlite:///{db}").get_experiment_by_name("kdprune").experiment_id == result["id"]


# -- a tracking server that is down ------------------------------------------------------------------------


def test_stage_fails_fast_naming_a_server_that_is_down(prepared: dict[str, Any], tmp_path: Path) -> None:
    uri = "http://127.0.0.1:9"
    out, plots = tmp_path / "teacher", tmp_path / "plots" / "train_teacher.csv"
    start = time.monotonic()
    res = subprocess.run(stage_cmd("train_teacher", prepared["params"], data=prepared["data"], out=out, plots=plots),
                         cwd=tmp_path, env=stage_env(uri), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 2, res.stderr[-2000:]
    assert elapsed < 30
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors and uri in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "epoch 1/" not in res.stderr  # refused before training, not after
    assert not out.exists() and not plots.exists()
    assert not list(tmp_path.glob(".teacher.*"))


# -- a real tracking server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path) -> None:
        self.artifacts = root / "srv-artifacts"
        self.log = root / "server.log"
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(
                [PY, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid  # its own session, so its own process group

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {timeout}s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.25)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 20) -> bool:
        """SIGTERM the whole process group, SIGKILL what is left; True if it went on SIGTERM alone."""
        with_term = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (self.proc.poll() is None or self.group_alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.proc.poll() is None or self.group_alive():
            with_term = False
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        return with_term


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def test_stages_log_to_a_real_tracking_server(mlflow_server: Server, tmp_path: Path) -> None:
    import psutil

    uri = mlflow_server.uri
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(work / "params.yaml")
    paths = stage_paths(work)
    for name in ("prepare", "train_teacher"):
        res = subprocess.run(stage_cmd(name, params, **paths[name]), cwd=work, env=stage_env(uri),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{name}:\n{res.stderr[-2000:]}"

    c = client(uri)
    exp = c.get_experiment_by_name("kdprune")
    assert exp is not None
    runs = {r.data.tags["pipeline.stage"]: r for r in c.search_runs([exp.experiment_id], max_results=100)}
    assert sorted(runs) == ["prepare", "train_teacher"]
    assert [r.info.status for r in runs.values()] == ["FINISHED", "FINISHED"]
    teacher = runs["train_teacher"]
    record = json.loads((paths["train_teacher"]["out"] / "mlflow_run.json").read_text())
    assert record["run_id"] == teacher.info.run_id and record["tracking_uri"] == uri
    assert teacher.data.tags["pipeline.upstream.prepare"] == runs["prepare"].info.run_id
    epochs = yaml.safe_load(params.read_text())["teacher"]["epochs"]
    history = c.get_metric_history(teacher.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))
    models = c.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{teacher.info.run_id}'")
    assert len(models) == 1
    # the model went to the server's artifact store over HTTP, not to a local directory
    assert list(mlflow_server.artifacts.rglob("MLmodel"))
    assert not (work / "mlartifacts").exists()

    leader = psutil.Process(mlflow_server.proc.pid)
    started = [leader, *leader.children(recursive=True)]
    assert len(started) >= 2  # the CLI and its uvicorn worker: both must go
    assert mlflow_server.stop(), "the server's process group needed SIGKILL"
    assert not mlflow_server.group_alive()
    for p in started:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, f"left behind: {p}"


# -- failed and killed stages --------------------------------------------------------------------------------


class Fallback(Exception):
    """What the SIGTERM handler installed before a stage run raises: a SIGTERM that reaches it."""


@pytest.fixture
def sigterm_fallback() -> Iterator[Any]:
    """A harmless SIGTERM handler for the test process (so a stray SIGTERM cannot kill pytest), restored after."""
    import mlflow

    def handler(signum: int, frame: Any) -> None:
        raise Fallback()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")


@pytest.fixture
def store(prepared: dict[str, Any], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Any]:
    """(uri, a stage name no other test uses) in the already initialised store of `prepared`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", prepared["uri"])
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(prepared["root"])
    yield prepared["uri"], "probe " + request.node.name


def only_run(uri: str, stage: str) -> Any:
    c = client(uri)
    exp = c.get_experiment_by_name("kdprune")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`pipeline.stage` = '{stage}'")
    assert len(runs) == 1, f"{len(runs)} runs of {stage!r}"
    return runs[0]


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_stage_run_ends_with_the_status_of_its_body(store: Any, sigterm_fallback: Any,
                                                    error: BaseException | None, status: str) -> None:
    import mlflow

    from kdprune.tracking import stage_run

    uri, stage = store
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with stage_run(stage, {"widths": [1, 2]}):
            if error:
                raise error
    run = only_run(uri, stage)
    assert run.info.status == status
    assert run.data.params["widths"] == "1,2"
    assert mlflow.active_run() is None
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback


@pytest.mark.parametrize("during, status, raised", [
    ("body", "KILLED", "Terminated"),          # mid-stage: raised where the stage is
    ("start_run", "KILLED", "Terminated"),     # while the run is opened: held back, raised once it is open
    ("log_metrics", "KILLED", "Terminated"),   # while an epoch is logged: that write completes first
    ("end_run", "FINISHED", "Fallback"),       # while a finished run is closed: closed, then passed on
])
def test_sigterm_never_leaves_a_run_running(store: Any, sigterm_fallback: Any, during: str, status: str,
                                            raised: str) -> None:
    import mlflow

    from kdprune.tracking import Terminated, log_epoch, stage_run

    uri, stage = store
    with pytest.MonkeyPatch.context() as mp:
        if during != "body":
            real = getattr(mlflow, during)

            def with_sigterm(*args: Any, **kwargs: Any) -> Any:
                # the handler runs at the next bytecode, so inside this call: after the run is created,
                # or before the metric is written / the run is closed
                if during == "start_run":
                    result = real(*args, **kwargs)
                    signal.raise_signal(signal.SIGTERM)
                    return result
                signal.raise_signal(signal.SIGTERM)
                return real(*args, **kwargs)

            mp.setattr(mlflow, during, with_sigterm)
        caught: BaseException | None = None
        try:  # Terminated is a KeyboardInterrupt: caught here, or it would stop the whole session
            with stage_run(stage, {}):
                if during == "body":
                    signal.raise_signal(signal.SIGTERM)
                log_epoch(1, {"val_accuracy": 0.5})
        except BaseException as e:
            caught = e
    run = only_run(uri, stage)
    assert run.info.status == status
    assert type(caught) is (Terminated if raised == "Terminated" else Fallback), repr(caught)
    assert mlflow.active_run() is None
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback
    logged = len(client(uri).get_metric_history(run.info.run_id, "val_accuracy"))
    assert logged == (0 if during in ("body", "start_run") else 1)


def test_sigterm_mid_training_kills_the_run_and_keeps_the_old_output(prepared: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    uri = prepared["uri"]
    params = write_params(tmp_path / "params.yaml", teacher={"epochs": 200})
    out, plots = tmp_path / "teacher", tmp_path / "plots" / "train_teacher.csv"
    out.mkdir()
    (out / "sentinel.txt").write_text("the previous teacher\n")
    before = tree_bytes(out)
    log = tmp_path / "train_teacher.log"
    c = client(uri)
    exp_id = c.get_experiment_by_name("kdprune").experiment_id
    teacher_runs = "tags.`pipeline.stage` = 'train_teacher'"
    assert c.search_runs([exp_id], filter_string=teacher_runs) == []
    with log.open("w") as f:
        proc = subprocess.Popen(stage_cmd("train_teacher", params, data=prepared["data"], out=out, plots=plots),
                                cwd=prepared["root"], env=stage_env(uri), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        run_id = None
        while run_id is None:  # RUNNING, and training: at least one epoch logged
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "train_teacher never got to training"
            running = c.search_runs([exp_id], filter_string=f"{teacher_runs} and attributes.status = 'RUNNING'")
            if running and c.get_metric_history(running[0].info.run_id, "val_accuracy"):
                run_id = running[0].info.run_id
            else:
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        stop(proc)
    assert code == 130, log.read_text()[-2000:]
    assert "error: interrupted; no output written" in log.read_text()
    assert c.get_run(run_id).info.status == "KILLED"
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".teacher")) == []
    assert not plots.exists()
