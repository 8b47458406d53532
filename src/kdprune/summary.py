"""The summary run of a pipeline execution: its headline metrics, its reports, a description that
links every stage run it builds on, and this execution's stage runs nested under it. Runs in the
tracking helper, on the run `evaluate` opened with kind "summary"."""

from __future__ import annotations

from pathlib import Path

from kdprune import runs, store


def summarise(metrics: dict[str, float], artifacts: list[str], table: str) -> str:
    """Log the headline metrics (once, here only), the report files, and a description with the
    comparison table and a link to every stage run; nest this execution's stage runs. Returns the run id."""
    import mlflow

    active = runs.active()
    upstream = active["upstream"]
    store.call(mlflow.log_metrics, metrics, what="logging the headline metrics")
    for path in artifacts:
        store.call(mlflow.log_artifact, path, artifact_path="reports", what=f"logging {Path(path).name}")
    links = " · ".join(f"[{stage}](#/experiments/{active['experiment_id']}/runs/{run_id})"
                       for stage, run_id in upstream.items())
    note = f"{table}\nStage runs: {links or 'none found in this store'}\n"
    store.call(mlflow.set_tag, "mlflow.note.content", note, what="describing the run")
    runs.nest_execution(active["run_id"], active["experiment_id"], active.get("execution"))
    return active["run_id"]
