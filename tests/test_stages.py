"""Every stage end to end on the tiny config: outputs, lineage in MLflow, the summary run."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from kdprune.checkpoints import load_model
from kdprune.models import count_params
from tests.conftest import STAGES

MODELS = ("teacher", "student_scratch", "student", "pruned", "finetuned")
HEADLINE = ("accuracy", "params", "nonzero_params", "macs", "size_bytes", "latency_ms_b1", "latency_ms_b256")


def test_every_stage_writes_its_outputs(pipeline):
    for name, paths in pipeline["paths"].items():
        for key, path in paths.items():
            if key in ("out", "metrics", "report", "plot", "plots"):
                assert path.exists(), f"{name} did not write {path}"
    for split in ("train", "val", "test"):
        assert (pipeline["root"] / "data/prepared" / f"{split}.pt").exists()


def test_evaluate_reports_every_model(pipeline):
    metrics = json.loads((pipeline["root"] / "metrics/evaluate.json").read_text())
    assert set(MODELS) <= set(metrics)
    for name in MODELS:
        for key in HEADLINE:
            assert isinstance(metrics[name][key], (int, float)), (name, key)
        assert 0.0 <= metrics[name]["accuracy"] <= 1.0
        assert metrics[name]["latency_ms_b256"] > 0
    # the accuracies are real: the evaluated model, re-run here, scores the same
    model, _ = load_model(pipeline["root"] / "models/finetuned")
    test = torch.load(pipeline["root"] / "data/prepared/test.pt", weights_only=True)
    assert len(test["y"]) == 360
    assert metrics["finetuned"]["params"] == count_params(model)
    assert metrics["pruned"]["params"] < metrics["student"]["params"] < metrics["teacher"]["params"]
    table = (pipeline["root"] / "reports/comparison.md").read_text()
    assert all(f"| {name} |" in table for name in MODELS)


def test_student_is_at_most_a_quarter_of_the_default_teacher():
    from kdprune.models import build_model
    from kdprune.params import load_params
    from kdprune.trainer import model_spec
    from tests.conftest import REPO

    p = load_params(REPO / "params.yaml")
    meta = {"in_channels": 1, "image_size": 8, "num_classes": 10}
    teacher, student = (count_params(build_model(model_spec(c, meta))) for c in (p.teacher, p.student))
    assert student <= teacher / 4


def _runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("kdprune")
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_one_finished_run_per_stage_linked_upstream(pipeline):
    runs = _runs(pipeline["uri"])
    stage_runs = {r.data.tags["pipeline.stage"]: r for r in runs if r.data.tags.get("pipeline.kind") == "stage"}
    assert sorted(stage_runs) == sorted(s for s in STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    ids = {s: r.info.run_id for s, r in stage_runs.items()}
    finetune = stage_runs["finetune"].data.tags
    for upstream in ("prepare", "train_teacher", "soft_labels", "train_student", "score", "prune"):
        assert finetune[f"pipeline.upstream.{upstream}"] == ids[upstream]
    assert stage_runs["prune"].data.params["prune.amount"] == "0.5"
    record = json.loads((pipeline["root"] / "models/finetuned/mlflow_run.json").read_text())
    assert record["run_id"] == ids["finetune"]


def test_summary_run_carries_every_param_and_headline_metric(pipeline):
    (summary,) = [r for r in _runs(pipeline["uri"]) if r.data.tags.get("pipeline.kind") == "summary"]
    assert summary.data.params["prune.criterion"] == "taylor"
    assert summary.data.params["teacher.channels"] == "8,16"
    assert len(summary.data.params) >= 40
    metrics = json.loads((pipeline["root"] / "metrics/evaluate.json").read_text())
    assert summary.data.metrics["finetuned.accuracy"] == pytest.approx(metrics["finetuned"]["accuracy"])
    for stage in STAGES:
        assert f"pipeline.run.{stage}" in summary.data.tags


def test_logged_models_load_back(pipeline):
    runs = {r.data.tags["pipeline.stage"]: r for r in _runs(pipeline["uri"])
            if r.data.tags.get("pipeline.kind") == "stage"}
    client = mlflow.MlflowClient(pipeline["uri"])
    for stage in ("train_teacher", "train_student", "finetune"):
        models = client.search_logged_models([runs[stage].info.experiment_id],
                                             filter_string=f"source_run_id = '{runs[stage].info.run_id}'")
        assert len(models) == 1, stage


def test_soft_labels_are_logits_with_provenance(pipeline):
    from kdprune.files import sha256

    root = pipeline["root"]
    logits = torch.load(root / "artifacts/soft_labels/logits.pt", weights_only=True)["train"]
    assert logits.shape[1] == 10 and not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))
    prov = json.loads((root / "artifacts/soft_labels/provenance.json").read_text())
    assert prov["teacher_sha256"] == sha256(root / "models/teacher/model.pt")


def test_pruned_model_rebuilds_exactly_from_its_spec(pipeline):
    root = pipeline["root"]
    pruned, spec = load_model(root / "models/pruned")
    student, student_spec = load_model(root / "models/student")
    assert sum(spec["channels"]) + sum(spec["hidden"]) < sum(student_spec["channels"]) + sum(student_spec["hidden"])
    assert all(w >= 1 for w in spec["channels"] + spec["hidden"])
    assert count_params(pruned) < count_params(student)


def test_same_params_same_seed_give_identical_bytes(tmp_path, mlflow_store):
    from tests.conftest import run_stage, stage_paths, write_params

    params = write_params(tmp_path / "params.yaml")
    for run in ("a", "b"):
        paths = stage_paths(tmp_path / run)
        for name in ("prepare", "train_teacher", "soft_labels", "train_student"):
            run_stage(name, params, **paths[name])
    for rel in ("data/prepared/train.pt", "data/prepared/test.pt", "models/teacher/model.pt",
                "artifacts/soft_labels/logits.pt", "models/student/model.pt"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_soft_labels_from_another_teacher_are_refused_naming_both(pipeline, tmp_path, mlflow_store):
    from kdprune.errors import CheckpointError
    from tests.conftest import run_stage

    paths = {**pipeline["paths"]["train_student"], "out": tmp_path / "student",
             "plots": tmp_path / "curve.csv", "teacher": pipeline["root"] / "models/student_scratch"}
    with pytest.raises(CheckpointError) as e:
        run_stage("train_student", pipeline["params"], **paths)
    assert str(pipeline["root"] / "artifacts/soft_labels/provenance.json") in str(e.value)
    assert str(pipeline["root"] / "models/student_scratch/model.pt") in str(e.value)
    assert not (tmp_path / "student").exists()


def test_the_finetuned_model_is_registered_only_within_the_accuracy_drop(pipeline, tmp_path, monkeypatch):
    from tests.conftest import load_stage, write_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline["uri"])
    evaluate = load_stage("evaluate")
    p = evaluate.load_params(write_params(tmp_path / "p.yaml", evaluate={"registered_model": "kd-test"}))
    finetuned = {"accuracy": 0.9, "accuracy_drop_vs_student": 0.02, "params_vs_student": 0.3}
    verdict = evaluate.register(p, finetuned, pipeline["root"] / "models/finetuned")
    assert verdict.startswith("not registered in kd-test: accuracy drop against the student 0.0200 exceeds")
    client = mlflow.MlflowClient(pipeline["uri"])
    assert client.search_registered_models("name = 'kd-test'") == []
    verdict = evaluate.register(p, {**finetuned, "accuracy_drop_vs_student": 0.005},
                                pipeline["root"] / "models/finetuned")
    assert verdict == "registered the fine-tuned model as kd-test version 1"
    (version,) = client.search_model_versions("name = 'kd-test'")
    assert version.tags["params_vs_student"] == "0.3"
    assert version.run_id == json.loads((pipeline["root"] / "models/finetuned/mlflow_run.json").read_text())["run_id"]


def test_prune_in_rounds_and_unstructured_masks_survive_finetuning(pipeline, tmp_path, mlflow_store):
    from tests.conftest import run_stage, write_params

    params = write_params(tmp_path / "p.yaml", prune={"structured": False, "amount": 0.8, "steps": 3,
                                                      "round_epochs": 1})
    paths = pipeline["paths"]
    run_stage("prune", params, **{**paths["prune"], "out": tmp_path / "pruned"})
    run_stage("finetune", params, **{**paths["finetune"], "pruned": tmp_path / "pruned",
                                     "out": tmp_path / "finetuned", "plots": tmp_path / "ft.csv"})
    masks = torch.load(tmp_path / "pruned/masks.pt", weights_only=True)
    model, _ = load_model(tmp_path / "finetuned")
    zeroed = sum(int((~m).sum()) for m in masks.values())
    assert zeroed / sum(m.numel() for m in masks.values()) == pytest.approx(0.8, abs=0.03)
    for u in model.units():
        assert torch.all(u.layer.weight[~masks[u.name]] == 0)
