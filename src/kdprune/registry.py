"""The model registry: a fine-tuned model registered once, from the run that made its file, and the
alias `champion` on the most compressed version that kept its accuracy. Runs in the tracking helper."""

from __future__ import annotations

import json
from typing import Any

from kdprune import runs, store

ALIAS = "champion"
# What a version carries as tags (its metrics): the champion is chosen on these.
TAGGED = ("accuracy", "accuracy_drop_vs_student", "params_vs_teacher", "params_vs_student", "nonzero_params_vs_teacher",
          "macs_vs_student", "speedup_b256_vs_student")


def model_name(setting: str, dataset: str) -> str:
    """The registered model that evaluate.registered_model names: itself, or kdprune-<dataset> for `auto`."""
    return f"kdprune-{dataset}" if setting == "auto" else setting


def register(name: str, finetuned: str, metrics: dict[str, float], max_drop: float, description: str) -> str:
    """Register the fine-tuned model whose directory has fingerprint `finetuned`, linked to the active
    (summary) run that compares it, when its accuracy drop against the student is within `max_drop`; then move
    `champion` to the most compressed version within that drop. Returns one line saying what happened.

    The model registered is the one MLflow logged from the finetune run that made this very file,
    found by the file's fingerprint: never a URI read from a file. `description` (the sentence the summary
    run's description opens with) describes the version."""
    client = runs._client()
    experiment_id, summary_id = runs.active()["experiment_id"], runs.active()["run_id"]
    drop = metrics["accuracy_drop_vs_student"]
    if drop > max_drop:
        return (f"not registered in {name}: accuracy drop against the student {drop:.4f} "
                f"exceeds evaluate.max_accuracy_drop {max_drop}")
    made = store.call(client.search_runs, [experiment_id], f"tags.`pipeline.output` = '{finetuned}' and "
                      "tags.`pipeline.stage` = 'finetune' and attributes.status = 'FINISHED'",
                      order_by=["attributes.start_time DESC"], max_results=1, what="finding the finetune run")
    if not made:
        return (f"not registered in {name}: no finished finetune run in {store.tracking_uri()} made this "
                f"models/finetuned (fingerprint {finetuned[:12]}); `dvc repro -f finetune` logs one")
    logged = store.call(client.search_logged_models, [experiment_id],
                        filter_string=f"source_run_id = '{made[0].info.run_id}'", what="finding its model")
    logged = [m for m in logged if m.name == "finetuned"]
    if not logged:
        return f"not registered in {name}: finetune run {made[0].info.run_id} logged no model"
    version = _version_for(client, name, finetuned, logged[0], summary_id, metrics, description)
    champion = _crown(client, name, max_drop)
    return (f"registered the fine-tuned model as {name} version {version}; "
            f"{name}@{ALIAS} is version {champion}")


def _version_for(client: Any, name: str, finetuned: str, logged: Any, summary_id: str,
                 metrics: dict[str, float], description: str) -> str:
    """The existing version made from this file, or a new one: a sweep point seen twice adds nothing."""
    from mlflow.exceptions import MlflowException

    try:
        store.call(client.create_registered_model, name, what="creating the registered model")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    versions = store.call(client.search_model_versions, f"name = '{name}'", what="listing versions")
    for v in versions:
        if v.tags.get("pipeline.output") == finetuned:
            return str(v.version)
    tags = {k: f"{metrics[k]:.6g}" for k in TAGGED if k in metrics} | {"pipeline.output": finetuned}
    v = store.call(client.create_model_version, name, source=logged.model_uri, run_id=summary_id, tags=tags,
                   model_id=logged.model_id, description=description, what="registering a version")
    # what MLflow's REST server records itself: the logged model's page then shows its registered version
    versions = json.loads(logged.tags.get("mlflow.modelVersions", "[]")) + [{"name": name, "version": v.version}]
    store.call(client.set_logged_model_tags, logged.model_id, {"mlflow.modelVersions": json.dumps(versions)},
               what="linking the model to its version")
    return str(v.version)


def _crown(client: Any, name: str, max_drop: float) -> str:
    """Point `champion` at the version with the fewest non-zero parameters (relative to its teacher)
    among those within `max_drop`; ties go to the more accurate. Recomputed over every version, so a
    later, worse sweep point never demotes a better champion."""
    versions = store.call(client.search_model_versions, f"name = '{name}'", what="listing versions")

    def key(v: Any) -> tuple[float, float]:
        t = v.tags
        size = t.get("nonzero_params_vs_teacher", t.get("params_vs_teacher", "inf"))
        return float(size), -float(t.get("accuracy", 0))

    eligible = [v for v in versions if float(v.tags.get("accuracy_drop_vs_student", "inf")) <= max_drop]
    best = min(eligible, key=key)
    store.call(client.set_registered_model_alias, name, ALIAS, str(best.version), what="moving the champion alias")
    return str(best.version)
