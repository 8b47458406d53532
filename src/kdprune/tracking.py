"""MLflow tracking: where runs go, one run per executed stage, and its lineage on disk."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kdprune.errors import TrackingError
from kdprune.files import RUN_FILE, read_json, write_json

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A server that is down should fail a stage in seconds, not after minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

EXPERIMENT = "kdprune"
_SQLITE = re.compile(r"^sqlite(\+\w+)?://")
_EXPS_MARK = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


@dataclass(frozen=True)
class StageRun:
    stage: str
    run_id: str
    experiment_id: str
    upstream: dict[str, str]  # {stage: run id} of every run this one builds on


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run is closed as KILLED and no output is written."""


def repo_root() -> Path:
    """The project root, also from inside a queued DVC experiment's temporary copy (.dvc/tmp/exps/...)."""
    here = str(Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve())
    return Path(here.split(_EXPS_MARK)[0]) if _EXPS_MARK in here else Path(here)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} is not answering ({reason})") from e


def _store_lock(uri: str) -> Any:
    """The lock that serialises opening a sqlite store: .mlflow.lock in the database's own directory,
    so processes started from different working directories (or DVC experiment copies) share it."""
    from filelock import FileLock

    if not _SQLITE.match(uri):
        return contextlib.nullcontext()
    return FileLock(str(_sqlite_dir(uri) / ".mlflow.lock"))


def _sqlite_dir(uri: str) -> Path:
    """The directory of a sqlite store's database file: its lock and, by default, its artifacts go there."""
    path = _SQLITE.sub("", uri, count=1).split("?", 1)[0]
    if path.startswith("/"):  # sqlite:///<path>: the third slash separates, an absolute path keeps its own
        path = path[1:]
    return Path(path).resolve().parent if path not in ("", ":memory:") else repo_root()


def ensure_experiment() -> str:
    """Connect, creating the store and the experiment once, under a lock, and return its id.

    Several processes opening a brand-new sqlite store at once corrupt it, and two creating
    the same experiment race: one lock file beside the database serialises both.
    """
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    if _SQLITE.match(uri):
        # Seconds of imports and ORM set-up: done before the lock, so only the database work is serialised.
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    try:
        with _store_lock(uri):
            exp = mlflow.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = (_sqlite_dir(uri) / "mlartifacts").as_uri() if _SQLITE.match(uri) else None
            try:
                return mlflow.create_experiment(name, artifact_location=location)
            except mlflow.exceptions.MlflowException:  # another process won the race on a server
                return mlflow.get_experiment_by_name(name).experiment_id
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {uri}: {str(e).splitlines()[0]}") from e


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def lineage(input_dirs: list[Path]) -> dict[str, str]:
    """{stage: run id} of every run upstream of these inputs, read from their mlflow_run.json."""
    runs: dict[str, str] = {}
    for d in input_dirs:
        if (Path(d) / RUN_FILE).exists():
            record = read_json(Path(d) / RUN_FILE)
            runs.update(record.get("upstream", {}))
            runs[record["stage"]] = record["run_id"]
    return runs


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], inputs: list[Path] = (), kind: str = "stage",
              tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """One MLflow run for one executed stage: tagged, its params logged, linked to its upstream runs.

    Ends FINISHED on success, FAILED on an exception, KILLED on Ctrl-C or SIGTERM; never RUNNING.
    """
    import mlflow

    experiment_id = ensure_experiment()
    upstream = lineage(list(inputs))
    all_tags = {"pipeline.stage": stage, "pipeline.kind": kind, **(tags or {}),
                **{f"pipeline.upstream.{s}": r for s, r in upstream.items()}}
    if commit := git_commit():
        all_tags["mlflow.source.git.commit"] = commit
    if exp := os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc.exp_name"] = exp
    # SIGTERM raises Terminated in the body, but never half-way through an MLflow call: there it is
    # held back and raised right after, so the run is always closed and never left RUNNING.
    sigterm = _Sigterm()
    run = None
    status = "KILLED"
    try:
        with sigterm.held():
            run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags)
        with sigterm.held():
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield StageRun(stage, run.info.run_id, run.info.experiment_id, upstream)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        sigterm.hold()
        try:
            if run is not None and status == "FINISHED":
                mlflow.end_run(status)
            elif run is not None:
                with contextlib.suppress(Exception):  # the stage's own error is already on its way
                    mlflow.end_run(status)
        finally:
            sigterm.restore(redeliver=status == "FINISHED")


class _Sigterm:
    """While a stage run is open: SIGTERM raises Terminated, except inside `held()` (an MLflow call),
    where it is noted and raised on leaving it. Only the main thread handles signals: elsewhere inert."""

    active: _Sigterm | None = None

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.previous: Any = None
        self.outer = _Sigterm.active
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            _Sigterm.active = self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = True
        else:
            raise Terminated(f"signal {signum}")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise Terminated(f"signal {int(signal.SIGTERM)}")

    def hold(self) -> None:
        """Hold SIGTERM back for good: the run is being closed."""
        self.depth += 1

    def restore(self, redeliver: bool) -> None:
        """Give SIGTERM back to its previous handler; one held back meanwhile goes to it if `redeliver`."""
        if not self.installed:
            return
        self.installed = False
        _Sigterm.active = self.outer
        signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
        if self.pending and redeliver:
            signal.raise_signal(signal.SIGTERM)


def _held() -> Any:
    """Hold SIGTERM back across one MLflow call of an open stage run."""
    return _Sigterm.active.held() if _Sigterm.active is not None else contextlib.nullcontext()


def _param(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def write_run_record(out_dir: Path, run: StageRun, model_uri: str | None = None) -> None:
    """mlflow_run.json: the run that made this artifact, every run upstream of it, and the
    MLflow model logged from it, if any."""
    record = {"run_id": run.run_id, "experiment_id": run.experiment_id, "stage": run.stage,
              "tracking_uri": tracking_uri(), "upstream": run.upstream}
    write_json(out_dir / RUN_FILE, record if model_uri is None else {**record, "model_uri": model_uri})


def log_epoch(step: int, metrics: dict[str, float]) -> None:
    """One batched call per epoch."""
    import mlflow

    with _held():
        mlflow.log_metrics(metrics, step=step)


def log_artifact(path: Path) -> None:
    """A file of this stage's (a plot) attached to its run."""
    import mlflow

    with _held():
        mlflow.log_artifact(str(path))


def log_model(model: Any, example: Any, name: str = "model") -> str:
    """The model as an MLflow pt2 artifact (torch.export: no pickle), with an input example; its URI."""
    import mlflow
    import torch

    with _held():
        info = mlflow.pytorch.log_model(model.cpu().eval(), name=name, input_example=example[:2].cpu().numpy(),
                                        serialization_format="pt2",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def register_model(model_uri: str, name: str, tags: dict[str, Any]) -> str:
    """A new version of `name` in the MLflow model registry, tagged; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def summary_run(params: dict[str, Any], metrics: dict[str, float], stage_runs: dict[str, str],
                artifacts: list[Path]) -> str:
    """The one run per pipeline execution that the MLflow compare view works on: every param,
    every headline metric, the report files, and a tag per stage run it summarises."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    tags = {"pipeline.kind": "summary", **{f"pipeline.run.{s}": r for s, r in stage_runs.items()}}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp
    client = MlflowClient(tracking_uri())
    # Its own top-level run (not nested under evaluate's), so the compare view lists it directly.
    with _held():  # SIGTERM waits until the run exists and is closed again: never left RUNNING
        run_id = client.create_run(ensure_experiment(), run_name=f"summary {exp}" if exp else "summary",
                                   tags=tags).info.run_id
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        with _held():
            client.log_batch(run_id, params=[Param(k, str(_param(v))) for k, v in params.items()],
                             metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
            for path in artifacts:
                client.log_artifact(run_id, str(path))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with _held():
            client.set_terminated(run_id, status)
    return run_id
