"""MLflow runs of the pipeline: one per executed stage, found again by the fingerprints of what it made.

A stage run is tagged with the fingerprint of every input it read (`pipeline.input.<role>`) and of
the output it made (`pipeline.output`); its upstream runs are the FINISHED runs whose output is one
of its inputs, so lineage holds across clones and machines sharing a server, and nothing per-run is
ever written into an output. `evaluate` opens the summary run of a pipeline execution: every param,
the headline metrics, the reports, and the stage runs of its execution nested under it.

These functions run in the tracking service (kdprune.tracker), one thread per stage connected to it,
each with its own active run (MLflow's active run is thread-local too).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from kdprune import procs, store
from kdprune.errors import TrackingError
from kdprune.files import write_atomic

_LOCAL = threading.local()  # this thread's (stage's) open run: run_id, experiment_id, kind, execution, upstream


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient(store.tracking_uri())


def open_run(stage: str, kind: str, name: str, params: dict[str, Any], inputs: dict[str, str],
             owner: str | None, execution: str | None, exp_name: str | None = None, commit: str | None = None,
             local: str | None = None) -> None:
    """Start the run of one executed stage (kind "stage") or of a pipeline execution's summary
    (kind "summary"), tagged with its inputs' fingerprints and the upstream runs found by them.

    The run is created by the client with its tags spelled out (the fluent start_run would spend two
    seconds asking git and its context providers), then made this thread's active run, where log_model's
    LoggedModel finds its experiment. If either step after the creation fails, the run is closed FAILED."""
    import mlflow
    from mlflow.entities import Param

    experiment_id = store.ensure_experiment()
    _LOCAL.local = Path(local) if local else store.local_dir()
    reconcile(experiment_id)
    upstream = store.call(_upstream, experiment_id, inputs, what="looking up upstream runs")
    tags = {"mlflow.runName": name, "pipeline.stage": stage, "pipeline.kind": kind,
            "pipeline.host": socket.gethostname(), "mlflow.source.name": f"stages/{stage}.py",
            "mlflow.source.type": "LOCAL",
            **{f"pipeline.input.{role}": fp for role, fp in inputs.items()},
            **{f"pipeline.{'run' if kind == 'summary' else 'upstream'}.{s}": r for s, r in upstream.items()}}
    for key, value in (("pipeline.owner", owner), ("pipeline.execution", execution), ("dvc.exp_name", exp_name),
                       ("mlflow.source.git.commit", commit)):
        if value:
            tags[key] = value
    client = _client()
    run_id = store.call(client.create_run, experiment_id, tags=tags, run_name=name, what="starting a run").info.run_id
    try:
        store.call(client.log_batch, run_id, params=[Param(k, str(_param(v))) for k, v in params.items()],
                   what="logging params")
        store.call(mlflow.start_run, run_id=run_id, what="activating the run")
    except Exception:  # no run is open: the stage's next messages are refused, none logs into a run of its own
        try:
            _close(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the store's first error is the one to report
            _remember(run_id, "FAILED")
        raise
    _LOCAL.active = {"run_id": run_id, "experiment_id": experiment_id, "kind": kind,
                     "execution": execution, "upstream": upstream,
                     "source": {k: tags[k] for k in ("mlflow.source.name", "mlflow.source.git.commit")
                                if k in tags}}  # log_model tags the stage's models with it


def warm_up() -> None:
    """Between stages (tracker.Service): import and exercise what logging a model needs, into a throw-away
    folder, so the log_model a stage waits for at its end costs a fraction of a second."""
    import tempfile

    import mlflow.onnx
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "warm",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.zeros((1, 2), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.onnx.save_model(model, f"{tmp}/m", **model_inputs(x, x, ("input", "logits")), pip_requirements=["onnx"],
                               onnx_execution_providers=["CPUExecutionProvider"])
    del onnx


def warm_reads(experiment_id: str) -> None:
    """The reads a stage's first `open` makes, made once before it comes: SQLAlchemy compiles each kind of
    statement once per process (a cold `open` took 0.16 s, a warm one 0.06 s). Nothing is written."""
    client = _client()
    client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1)
    for run in client.search_runs([experiment_id], max_results=1):
        client.get_run(run.info.run_id)


def _upstream(experiment_id: str, inputs: dict[str, str]) -> dict[str, str]:
    """{stage: run id} of the runs that made the inputs, and of every run upstream of those."""
    client, found = _client(), {}
    for fp in inputs.values():
        runs = client.search_runs([experiment_id], f"tags.`pipeline.output` = '{fp}' and attributes.status = "
                                  "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            tags = runs[0].data.tags
            found.update({k.split(".", 2)[2]: v for k, v in tags.items() if k.startswith("pipeline.upstream.")})
            found[tags["pipeline.stage"]] = runs[0].info.run_id
    return found


# Every message after `open` names its run by id: MLflow's fluent calls (mlflow.log_metrics, set_tags, ...)
# start a run of their own where none is active, and log into that.

def log_batch(run_id: str, what: str, metrics: dict[str, float] | None = None, step: int = 0,
              tags: dict[str, Any] | None = None) -> None:
    """One call to the store for run `run_id`: `metrics` at `step`, `tags` as text."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    store.call(_client().log_batch, run_id, metrics=[Metric(k, v, now, step) for k, v in (metrics or {}).items()],
               tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()], what=what)


def log_epoch(step: int, metrics: dict[str, float]) -> None:
    log_batch(active()["run_id"], "logging metrics", metrics=metrics, step=step)


def log_artifact(path: str, folder: str | None = None) -> None:
    store.call(_client().log_artifact, active()["run_id"], path, artifact_path=folder,
               what=f"logging {Path(path).name}")


def model_inputs(example: Any, logits: Any, names: tuple[str, str]) -> dict[str, Any]:
    """`signature=` and `input_example=` for mlflow.onnx.log_model, from a few rows and their logits:
    tensor specs named like the graph's input and output, the batch axis left free (-1)."""
    import numpy as np
    from mlflow.models import infer_signature

    x, y = np.asarray(example, dtype=np.float32), np.asarray(logits, dtype=np.float32)
    return {"signature": infer_signature({names[0]: x}, {names[1]: y}), "input_example": {names[0]: x}}


def log_model(path: str, name: str, example: list, logits: list, names: tuple[str, str]) -> str:
    """The ONNX file as an MLflow model named after its role, with an input example and a signature.
    onnx_execution_providers is the CPU's, or MLflow warns that CUDA's is missing."""
    import mlflow.onnx
    import onnx
    import onnxruntime

    run = active()
    info = store.call(mlflow.onnx.log_model, onnx.load(path), name=name, run_id=run["run_id"],
                      **model_inputs(example, logits, names),
                      save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
                      tags=run.get("source", {}),
                      pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
                      what=f"logging the {name} model")
    return info.model_uri


def set_tags(tags: dict[str, str]) -> None:
    log_batch(active()["run_id"], "tagging the run", tags=tags)


def finish(status: str, output: str | None = None, tags: dict[str, str] | None = None) -> None:
    """Close the open run with `tags`; a FINISHED one records its output's fingerprint for the stages
    downstream. A run that cannot be closed is written down locally and closed by the next stage that starts."""
    run_id = getattr(_LOCAL, "active", {}).get("run_id")
    if run_id is None:
        return
    try:
        tags = {**(tags or {}), **({"pipeline.output": output} if output and status == "FINISHED" else {})}
        if tags:  # one call
            log_batch(run_id, "recording the output and the machine", tags=tags)
        _close(run_id, status)
    except Exception:
        _remember(run_id, "FAILED" if status == "FINISHED" else status)
        raise
    finally:
        _LOCAL.active = {}


def _close(run_id: str, status: str) -> None:
    """End the run as `status`, and as this thread's active run where it is that."""
    import mlflow

    if (current := mlflow.active_run()) is not None and current.info.run_id == run_id:
        store.call(mlflow.end_run, status, what="closing the run")
    else:
        store.call(_client().set_terminated, run_id, status, what="closing the run")


def nest_execution(summary_id: str, experiment_id: str, execution: str | None) -> None:
    """Make this execution's stage runs children of its summary run (MLflow's parent/child runs)."""
    if not execution:
        return
    client = _client()
    runs = store.call(client.search_runs, [experiment_id],
                      f"tags.`pipeline.execution` = '{execution}' and tags.`pipeline.kind` = 'stage'",
                      max_results=100, what="finding this execution's stage runs")
    for r in runs:
        store.call(client.set_tag, r.info.run_id, "mlflow.parentRunId", summary_id, what="nesting a stage run")


def reconcile(experiment_id: str) -> list[str]:
    """Close what a dead process left open: runs recorded locally as unclosable, and RUNNING runs of
    this host whose owner process is gone (KILLED). Returns one line per run closed."""
    from mlflow.exceptions import MlflowException

    client, done = _client(), []
    pending = _local_dir() / "pending"
    for record in sorted(pending.glob("*.json")) if pending.is_dir() else ():
        try:  # (a record that cannot be read had stopped every tracked stage, naming no file)
            info = json.loads(record.read_text())
            uri, run_id, status = info["uri"], info["run_id"], info["status"]
        except (OSError, ValueError, TypeError, KeyError) as e:  # the owner check below still closes its run
            record.unlink(missing_ok=True)
            done.append(f"dropped the unreadable record {record} ({type(e).__name__}: {e})")
            continue
        if uri != store.tracking_uri():
            continue
        try:
            store.call(client.set_terminated, run_id, status, what="closing a pending run")
            done.append(f"closed run {run_id} as {status} (its stage could not reach the store)")
        except MlflowException as e:  # the run is gone (a reset store) or already closed: the record is moot
            done.append(f"dropped the record of run {run_id} ({str(e).splitlines()[0]})")
        record.unlink()
    running = store.call(client.search_runs, [experiment_id], "attributes.status = 'RUNNING' and "
                         f"tags.`pipeline.host` = '{socket.gethostname()}'", max_results=1000,
                         what="looking for runs left running")
    for r in running:
        owner = r.data.tags.get("pipeline.owner")
        if owner and procs.alive(owner) is False:
            store.call(client.set_terminated, r.info.run_id, "KILLED", what="closing a run left running")
            done.append(f"closed run {r.info.run_id} ({r.data.tags.get('pipeline.stage')}) as KILLED: "
                        f"its process {owner} is gone")
    return done


def _remember(run_id: str, status: str) -> None:
    """A run the store would not close now: the next stage start (or `kdprune doctor`) closes it."""
    pending = _local_dir() / "pending"
    try:
        pending.mkdir(parents=True, exist_ok=True)
        write_atomic(pending / f"{run_id}.json", json.dumps({"uri": store.tracking_uri(), "run_id": run_id,
                                                             "status": status}))
    except OSError:
        pass  # a full or read-only disk: the owner check in reconcile() still closes it, as KILLED


def _local_dir() -> Path:
    """The stage's clone's own folder for records (<repo root>/.kdprune), as the stage told us."""
    return getattr(_LOCAL, "local", None) or store.local_dir()


def _param(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def active() -> dict[str, Any]:
    """This thread's open run."""
    if not getattr(_LOCAL, "active", None):
        raise TrackingError("no run is open")
    return dict(_LOCAL.active)
