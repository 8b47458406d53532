"""MLflow tracking: where runs go, one run per executed stage, and its lineage on disk."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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


def ensure_experiment() -> str:
    """Connect, creating the store and the experiment once, under a lock, and return its id.

    Several processes opening a brand-new sqlite store at once corrupt it, and two creating
    the same experiment race: one lock file beside the database serialises both.
    """
    import mlflow
    from filelock import FileLock

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    lock = FileLock(str(repo_root() / ".mlflow.lock")) if uri.startswith("sqlite:") else contextlib.nullcontext()
    try:
        with lock:
            exp = mlflow.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = (repo_root() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
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
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags)
    try:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield StageRun(stage, run.info.run_id, run.info.experiment_id, upstream)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def _param(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def write_run_record(out_dir: Path, run: StageRun) -> None:
    """mlflow_run.json: the run that made this artifact, and every run upstream of it."""
    write_json(out_dir / RUN_FILE, {"run_id": run.run_id, "experiment_id": run.experiment_id, "stage": run.stage,
                                    "tracking_uri": tracking_uri(), "upstream": run.upstream})


def log_epoch(step: int, metrics: dict[str, float]) -> None:
    """One batched call per epoch."""
    import mlflow

    mlflow.log_metrics(metrics, step=step)


def log_model(model: Any, example: Any, name: str = "model") -> None:
    """The model as an MLflow pt2 artifact (torch.export: no pickle), with an input example."""
    import mlflow
    import torch

    mlflow.pytorch.log_model(model.cpu().eval(), name=name, input_example=example[:2].cpu().numpy(),
                             serialization_format="pt2", pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


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
    run_id = client.create_run(ensure_experiment(), run_name=f"summary {exp}" if exp else "summary",
                               tags=tags).info.run_id
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        client.log_batch(run_id, params=[Param(k, str(_param(v))) for k, v in params.items()],
                         metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id
