"""The summary run of a pipeline execution: its headline metrics, its reports, a description that
links every stage run it builds on, and this execution's stage runs nested under it. Runs in the
tracking helper, on the run `evaluate` opened with kind "summary"."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kdprune import runs, store

# The runs table's columns in the view evaluate links to: what a sweep is read by (MLflow's own table
# otherwise opens on Created, Duration and Source, every param and metric hidden).
VIEW_COLUMNS = ["attributes.`Models`", "params.`preset`", "params.`prune.criterion`", "params.`prune.amount`",
                "params.`seed`", "metrics.`finetuned.accuracy`", "metrics.`finetuned.accuracy_drop_vs_student`",
                "metrics.`finetuned.params_vs_teacher`", "metrics.`finetuned.speedup_b256_vs_student`",
                "metrics.`student.accuracy`", "metrics.`teacher.accuracy`"]


def summarise(metrics: dict[str, float], artifacts: list[str], table: str, headline: str) -> dict[str, Any]:
    """Log the headline metrics (once, here only; counts whole, the rest to 6 significant digits: the UI
    shows them whole), the report files (at the artifact root, where the compare view looks), the evaluated
    models as the run's inputs, and a description: `headline`, the comparison table and a link to every stage
    run; nest this execution's stage runs. Returns the run id."""
    active = runs.active()
    upstream, run_id = active["upstream"], active["run_id"]
    runs.log_batch(run_id, "logging the headline metrics",
                   metrics={k: float(v) if float(v).is_integer() else float(f"{v:.6g}") for k, v in metrics.items()})
    for path in artifacts:
        runs.log_artifact(path)
    _link_models(active, upstream)
    links = " · ".join(f"[{stage}](#/experiments/{active['experiment_id']}/runs/{stage_run})"
                       for stage, stage_run in upstream.items())
    # '@' would read as a GitHub mention in MLflow's markdown ("ms @256" -> a link)
    note = f"**{headline}**\n\n{table.replace('@', '&#64;')}\nStage runs: {links or 'none found in this store'}\n"
    store.call(runs._client().set_tag, run_id, "mlflow.note.content", note, what="describing the run")
    runs.nest_execution(run_id, active["experiment_id"], active.get("execution"))
    return {"run_id": run_id, "experiment_id": active["experiment_id"], "view": _share_view(active),
            "uri": store.tracking_uri()}


def _share_view(active: dict) -> str:
    """A saved view of the experiment's runs table with VIEW_COLUMNS (an experiment tag MLflow's UI reads
    by its key); returns the key, for the link evaluate prints."""
    value = json.dumps({"selectedColumns": VIEW_COLUMNS})
    key = hashlib.sha256(value.encode()).hexdigest()
    client = runs._client()
    tag = f"mlflow.sharedViewState.{key}"
    if tag not in store.call(client.get_experiment, active["experiment_id"], what="reading the experiment").tags:
        store.call(client.set_experiment_tag, active["experiment_id"], tag, value, what="saving the runs view")
    return key


def ui_links(info: dict[str, Any]) -> str:
    """Where to look: the summary run and the sweep's runs table, in MLflow's model-training view."""
    uri = info["uri"]
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    exp = f"{base}/#/experiments/{info['experiment_id']}"
    how = "" if uri.startswith("http") else " (after `mlflow ui --backend-store-uri sqlite:///mlflow.db`)"
    return (f"MLflow{how}: this run {exp}/runs/{info['run_id']}?workflowType=machine_learning ; "
            f"the runs table {exp}/runs?workflowType=machine_learning&viewStateShareKey={info['view']}")


def _link_models(active: dict, upstream: dict[str, str]) -> None:
    """The models this summary evaluated, as its inputs (MLflow's logged-model lineage)."""
    from mlflow.entities import LoggedModelInput

    client = runs._client()
    ids = []
    for run_id in upstream.values():
        found = store.call(client.search_logged_models, [active["experiment_id"]],
                           filter_string=f"source_run_id = '{run_id}'", what="finding the evaluated models")
        ids += [m.model_id for m in found]
    if ids:
        store.call(client.log_inputs, active["run_id"], models=[LoggedModelInput(i) for i in ids],
                   what="linking the evaluated models")
