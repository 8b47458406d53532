"""Every stage end to end on the tiny preset: outputs, manifests, ONNX, lineage in MLflow, the summary
run, the registry, and the files a stage refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kdprune import manifest
from kdprune.checkpoints import load_model
from kdprune.data import load_meta, load_split, normaliser
from kdprune.errors import CheckpointError
from kdprune.models import count_params, prunable_layers
from tests.conftest import STAGES, guarded, run_stage, tree_bytes, write_params

MODELS = ("teacher", "student_scratch", "student", "pruned", "finetuned")
DIRS = {"prepare": "data/prepared", "train_teacher": "models/teacher", "soft_labels": "artifacts/soft_labels",
        "train_scratch": "models/student_scratch", "train_student": "models/student", "score": "artifacts/scores",
        "prune": "models/pruned", "finetune": "models/finetuned"}


def _runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("kdprune")
    return client.search_runs([exp.experiment_id], max_results=1000)


def _test_inputs(root) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as the models see it: normalised floats (N, C, H, W), and labels."""
    test, norm = load_split(root / "data/prepared", "test"), normaliser(load_meta(root / "data/prepared"))
    return norm(test.x), test.y


def test_every_stage_writes_its_outputs_and_a_manifest_that_checks(pipeline):
    for name, paths in pipeline["paths"].items():
        for key, path in paths.items():
            if key in ("out", "agreement", "report", "plot", "plots", "headline", "metrics", "per_class",
                       "confusion"):
                assert path.exists(), f"{name} did not write {path}"
    for stage, rel in DIRS.items():
        fp = manifest.verify(pipeline["root"] / rel)
        assert json.loads((pipeline["root"] / rel / "manifest.json").read_text())["stage"] == stage
        assert len(fp) == 64
    assert not list(pipeline["root"].rglob("mlflow_run.json"))  # no run id in any output


def test_evaluate_reports_every_model_and_its_accuracy_is_real(pipeline):
    root = pipeline["root"]
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    x, y = _test_inputs(root)
    for name in MODELS:
        model, _ = load_model(root / "models" / name)
        with torch.no_grad():
            errors = int((model(x).argmax(1) != y).sum())
        assert metrics[name]["errors"] == errors, name  # re-run here, the same test errors
        assert metrics[name]["accuracy"] == pytest.approx(1 - errors / len(y))
        assert metrics[name]["params"] == count_params(model)
        sizes = {key: (root / "models" / name / file).stat().st_size
                 for key, file in (("size_bytes", "model.pt"), ("onnx_bytes", "model.onnx"))}
        assert {key: metrics[name][key] for key in sizes} == sizes, name  # the ONNX file: what MLflow serves
        for key in ("latency_ms_b1", "latency_ms_b256", "ort_latency_ms_b1", "ort_latency_ms_b256"):
            assert metrics[name][key] > 0, (name, key)
    assert metrics["pruned"]["params"] < metrics["student"]["params"] < metrics["teacher"]["params"]
    assert metrics["student"]["distill_gain"] == pytest.approx(
        metrics["student"]["accuracy"] - metrics["student_scratch"]["accuracy"])
    macs_cut = metrics["student"]["macs"] / metrics["finetuned"]["macs"]
    assert metrics["finetuned"]["time_per_macs_b256"] == pytest.approx(
        metrics["finetuned"]["speedup_b256_vs_student"] / macs_cut)
    table = (root / "reports/comparison.md").read_text()
    assert all(f"| {name} |" in table for name in MODELS)
    headline = json.loads((root / "metrics/headline.json").read_text())
    assert len(headline) == 12 and all(len(k) <= 17 for k in headline)  # `dvc exp show` fits a terminal
    assert headline["acc"] == metrics["finetuned"]["accuracy"]
    assert headline["kd_gain"] == metrics["student"]["distill_gain"]


def test_every_model_has_an_onnx_file_that_matches_pytorch_on_the_whole_test_split(pipeline):
    from kdprune.export import check_onnx

    x, _ = _test_inputs(pipeline["root"])
    for name in MODELS:
        model, _ = load_model(pipeline["root"] / "models" / name)
        assert check_onnx(pipeline["root"] / "models" / name / "model.onnx", model, x, atol=1e-4) <= 1e-4


def test_student_is_at_most_a_quarter_of_the_default_teacher():
    from kdprune.models import model_size_on_meta
    from kdprune.params import SHAPES, load_params
    from tests.conftest import REPO

    p = load_params(REPO / "params.yaml")
    shape = SHAPES[p.data.name]
    assert model_size_on_meta(p.student.spec(*shape)) <= model_size_on_meta(p.teacher.spec(*shape)) / 4


def test_one_finished_run_per_stage_linked_upstream_by_fingerprint(pipeline):
    runs = _runs(pipeline["uri"])
    stage_runs = {r.data.tags["pipeline.stage"]: r for r in runs if r.data.tags.get("pipeline.kind") == "stage"}
    assert sorted(stage_runs) == sorted(s for s in STAGES if s != "evaluate")
    assert all(r.info.status == "FINISHED" for r in runs)
    ids = {s: r.info.run_id for s, r in stage_runs.items()}
    for stage, rel in DIRS.items():  # each run carries the fingerprint of what it made
        assert stage_runs[stage].data.tags["pipeline.output"] == manifest.verify(pipeline["root"] / rel)
    finetune = stage_runs["finetune"].data.tags
    for upstream in ("prepare", "train_teacher", "soft_labels", "train_student", "score", "prune"):
        assert finetune[f"pipeline.upstream.{upstream}"] == ids[upstream]
    assert "pipeline.upstream.train_scratch" not in finetune
    assert stage_runs["prune"].data.params["prune.amount"] == "0.5"
    assert all(" · tiny taylor 0.5 seed 0" in r.info.run_name for r in stage_runs.values())
    import torch  # the machine's kind, which the bytes depend on: on every run, the summary's too

    kinds = {r.data.tags.get("pipeline.cpu") for r in runs}
    assert len(kinds) == 1 and kinds.pop().endswith(f" · {torch.backends.cpu.get_cpu_capability()}")


def test_the_summary_run_carries_every_param_and_is_the_only_run_with_headline_metrics(pipeline):
    import mlflow

    from kdprune.comparison import SUMMARY
    from kdprune.params import flatten, load_params

    runs = _runs(pipeline["uri"])
    (summary,) = [r for r in runs if r.data.tags.get("pipeline.kind") == "summary"]
    assert summary.info.run_name == "tiny taylor 0.5 seed 0"
    assert set(summary.data.params) == set(flatten(load_params(pipeline["params"])))
    assert summary.data.params["teacher.channels"] == "8,16"
    expected = {f"{m}.{k}" for m, keys in SUMMARY.items() for k in keys}
    assert set(summary.data.metrics) == expected
    others = set().union(*(r.data.metrics for r in runs if r is not summary))
    assert not others & expected  # no two runs of one execution share a headline metric
    for stage in STAGES:
        if stage != "evaluate":
            assert f"pipeline.run.{stage}" in summary.data.tags
    note = summary.data.tags["mlflow.note.content"]
    assert note.startswith("**fine-tuned: accuracy ") and "| finetuned |" in note and "@" not in note
    exp = mlflow.MlflowClient(pipeline["uri"]).get_experiment(summary.info.experiment_id)
    assert any(k.startswith("mlflow.sharedViewState.") for k in exp.tags)  # the view evaluate links to


def test_every_stage_logs_its_plots(pipeline):
    import mlflow

    client = mlflow.MlflowClient(pipeline["uri"])
    by_stage = {r.data.tags["pipeline.stage"]: r for r in _runs(pipeline["uri"])}
    expected = {"train_teacher": "train_teacher.csv", "score": "score.png", "prune": "prune.png",
                "finetune": "finetune.csv"}
    for stage, name in expected.items():
        assert name in [a.path for a in client.list_artifacts(by_stage[stage].info.run_id)], stage
    summary = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id)]
    assert {"tradeoff.png", "confusion.png", "comparison.md"} <= set(summary)  # at the root: the compare view's


def test_logged_models_are_named_by_role_and_load_back_with_identical_outputs(pipeline):
    import mlflow

    client = mlflow.MlflowClient(pipeline["uri"])
    exp = client.get_experiment_by_name("kdprune")
    logged = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert set(logged) == set(MODELS)
    mlflow.set_tracking_uri(pipeline["uri"])
    x, _ = _test_inputs(pipeline["root"])
    served = mlflow.pyfunc.load_model(logged["finetuned"].model_uri)
    out = served.predict({"input": x[:64].numpy()})
    model, _ = load_model(pipeline["root"] / "models/finetuned")
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(out["logits"]), model(x[:64]).numpy(), atol=1e-4)
    info = mlflow.models.get_model_info(logged["finetuned"].model_uri)
    assert info.signature is not None and info.flavors.get("onnx")


def test_soft_labels_are_logits_made_from_this_teacher_and_split(pipeline):
    root = pipeline["root"]
    logits = torch.load(root / "artifacts/soft_labels/logits.pt", weights_only=True)["train"]
    assert logits.shape[1] == 10 and not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))
    made = manifest.inputs_of(root / "artifacts/soft_labels")
    assert made == {"teacher": manifest.verify(root / "models/teacher"), "data": manifest.verify(root / "data/prepared")}


def test_the_pruned_model_rebuilds_from_its_spec_with_the_outputs_it_had(pipeline):
    import onnxruntime as ort

    root = pipeline["root"]
    pruned, spec = load_model(root / "models/pruned")
    _, student_spec = load_model(root / "models/student")
    assert "widths" in spec and "widths" not in student_spec
    assert count_params(pruned) < count_params(load_model(root / "models/student")[0])
    x, _ = _test_inputs(root)
    # model.onnx was exported from the pruned model in memory, before any file was read back
    session = ort.InferenceSession(str(root / "models/pruned/model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x[:128].numpy()})[0], pruned(x[:128]).numpy(),
                                   atol=1e-5)


def test_same_params_same_seed_give_identical_bytes_tracked_or_not(tmp_path, mlflow_store, monkeypatch):
    from tests.conftest import stage_paths

    params = write_params(tmp_path / "params.yaml")
    for run in ("a", "b"):
        if run == "b":
            monkeypatch.setenv("KDPRUNE_TRACKING", "off")
        paths = stage_paths(tmp_path / run)
        for name in ("prepare", "train_teacher", "soft_labels", "train_student"):
            run_stage(name, params, **paths[name])
    for rel in ("data/prepared", "models/teacher", "artifacts/soft_labels", "models/student",
                "plots/train_teacher.csv", "plots/train_student.csv"):
        a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
        assert (tree_bytes(a) == tree_bytes(b)) if a.is_dir() else a.read_bytes() == b.read_bytes(), rel


def test_soft_labels_from_another_teacher_are_refused_naming_both(pipeline, tmp_path, mlflow_store):
    root = pipeline["root"]
    paths = {**pipeline["paths"]["train_student"], "out": tmp_path / "student",
             "plots": tmp_path / "curve.csv", "teacher": root / "models/student_scratch"}
    with pytest.raises(CheckpointError) as e:
        run_stage("train_student", pipeline["params"], **paths)
    assert str(root / "artifacts/soft_labels/manifest.json") in str(e.value)
    assert str(root / "models/student_scratch") in str(e.value)
    assert not (tmp_path / "student").exists()


def test_scores_of_another_student_are_refused_naming_both(pipeline, tmp_path, mlflow_store):
    """Prune ranks the units by the scores' numbers: another student's (the control's, same shape) had
    pruned this one by them, unsaid."""
    root = pipeline["root"]
    paths = {**pipeline["paths"]["prune"], "out": tmp_path / "pruned", "plot": tmp_path / "prune.png",
             "student": root / "models/student_scratch"}
    with pytest.raises(CheckpointError) as e:
        run_stage("prune", pipeline["params"], **paths)
    assert str(root / "artifacts/scores/manifest.json") in str(e.value)
    assert "made from another student than " + str(root / "models/student_scratch") in str(e.value)
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "prune.png").exists()


def test_an_output_that_cannot_be_written_stops_the_stage_before_its_work(pipeline, tmp_path, untracked,
                                                                        monkeypatch):
    """A stage run by hand with a folder given for its curve, or its model under a file, trained every
    epoch and then failed (`Is a directory`)."""
    from kdprune import training

    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "plots").mkdir()
    (tmp_path / "a_file").write_text("")
    for bad in ({"plots": tmp_path / "plots"}, {"out": tmp_path / "a_file" / "scratch"}):
        paths = {**pipeline["paths"]["train_scratch"], "out": tmp_path / "scratch", "plots": tmp_path / "c.csv", **bad}
        with pytest.raises(OSError, match="cannot write here"):
            run_stage("train_scratch", pipeline["params"], **paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "plots"] and not any((tmp_path / "plots").iterdir())


def test_a_swapped_split_and_logits_from_elsewhere_are_refused_naming_the_file(pipeline, tmp_path, mlflow_store):
    root = pipeline["root"]
    data, soft = tmp_path / "prepared", tmp_path / "soft_labels"
    shutil.copytree(root / "data/prepared", data)
    shutil.copy(data / "test.pt", data / "train.pt")
    paths = {**pipeline["paths"]["soft_labels"], "data": data, "out": tmp_path / "out"}
    with pytest.raises(CheckpointError, match=str(data / "train.pt") + ": its SHA-256 differs from the one "
                       + str(data / "manifest.json")):
        run_stage("soft_labels", pipeline["params"], **paths)
    shutil.copytree(root / "artifacts/soft_labels", soft)
    logits = torch.load(soft / "logits.pt", weights_only=True)["train"]
    torch.save({"train": torch.randn_like(logits)}, soft / "logits.pt")
    paths = {**pipeline["paths"]["train_student"], "soft_labels": soft, "out": tmp_path / "student",
             "plots": tmp_path / "c.csv"}
    with pytest.raises(CheckpointError, match=str(soft / "logits.pt")):
        run_stage("train_student", pipeline["params"], **paths)
    assert not (tmp_path / "out").exists() and not (tmp_path / "student").exists()


ABOUT = "fine-tuned: accuracy 0.9000 (-0.0050 against the student)"  # what evaluate's headline line says


def test_the_registry_keeps_one_version_per_file_and_crowns_the_most_compressed(pipeline, monkeypatch):
    import mlflow

    from kdprune import registry, runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline["uri"])
    root = pipeline["root"]
    finetuned = manifest.verify(root / "models/finetuned")
    metrics = {"accuracy": 0.9, "accuracy_drop_vs_student": 0.02, "params_vs_teacher": 0.3,
               "nonzero_params_vs_teacher": 0.3}
    runs.open_run("evaluate", "summary", "registry test", {}, {"finetuned": finetuned}, None, None)
    summary_id = runs.active()["run_id"]
    try:
        verdict = registry.register("kd-test", finetuned, metrics, max_drop=0.01, description=ABOUT)
        assert verdict.startswith("not registered in kd-test: accuracy drop against the student 0.0200 exceeds")
        client = mlflow.MlflowClient(pipeline["uri"])
        assert client.search_registered_models("name = 'kd-test'") == []
        ok = {**metrics, "accuracy_drop_vs_student": 0.005}
        assert registry.register("kd-test", finetuned, ok, max_drop=0.01, description=ABOUT) == \
            "registered the fine-tuned model as kd-test version 1; kd-test@champion is version 1"
        again = registry.register("kd-test", finetuned, ok, max_drop=0.01, description=ABOUT)
        assert again.endswith("version 1")  # no new version
        missing = registry.register("kd-test", "0" * 64, ok, max_drop=0.01, description=ABOUT)
        assert missing.startswith("not registered in kd-test: no finished finetune run")
    finally:
        runs.finish("FINISHED")
    (version,) = client.search_model_versions("name = 'kd-test'")
    assert version.run_id == summary_id  # the run that shows the comparison
    assert version.tags["params_vs_teacher"] == "0.3"
    assert version.description == ABOUT
    assert client.get_model_version_by_alias("kd-test", "champion").version == version.version
    served = mlflow.pyfunc.load_model("models:/kd-test@champion")
    assert served.metadata.flavors.get("onnx")


def test_prune_in_rounds_and_unstructured_masks_survive_finetuning(pipeline, tmp_path, untracked):
    params = write_params(tmp_path / "p.yaml", prune={"structured": False, "amount": 0.8, "steps": 3,
                                                      "recover": {"epochs": 1}})
    paths = pipeline["paths"]
    run_stage("prune", params, **{**paths["prune"], "out": tmp_path / "pruned", "plot": tmp_path / "p.png"})
    run_stage("finetune", params, **{**paths["finetune"], "pruned": tmp_path / "pruned",
                                     "out": tmp_path / "finetuned", "plots": tmp_path / "ft.csv"})
    masks = torch.load(tmp_path / "pruned/masks.pt", weights_only=True)
    model, _ = load_model(tmp_path / "finetuned")
    zeroed = sum(int((~m).sum()) for m in masks.values())
    assert zeroed / sum(m.numel() for m in masks.values()) == pytest.approx(0.8, abs=0.03)
    layers = prunable_layers(model)
    assert set(masks) == set(layers)
    for name, layer in layers.items():
        assert torch.all(layer.weight[~masks[name]] == 0), name


def test_the_control_and_the_student_see_the_same_labelled_subset_in_as_many_steps(pipeline, tmp_path, mlflow_store,
                                                                                  monkeypatch):
    """With student.label_fraction < 1, the rows whose hard labels the control trains on are the rows whose
    labels the distilled student keeps (the rest it sees through the teacher alone): the same rows, not
    only as many, and the count each run logs. The control cycles them through epochs as long as the
    student's: at 0.1 it had taken a tenth of the student's optimiser steps, and its schedule a tenth of
    the length, so distillation was measured against an undertrained control."""
    from kdprune import training
    from kdprune.data import UNLABELLED

    fitted, epoch_rows, fit = [], [], training.fit

    def labelled_rows(model, train, *args, **kwargs):
        rows = torch.arange(len(train.y)) if train.rows is None else train.rows
        fitted.append(set(rows[train.y[rows] != UNLABELLED].tolist()))
        epoch_rows.append(len(train))
        return fit(model, train, *args, **kwargs)

    monkeypatch.setattr(training, "fit", labelled_rows)
    params = write_params(tmp_path / "p.yaml", student={"label_fraction": 0.3, "epochs": 1})
    paths = pipeline["paths"]
    run_stage("train_scratch", params, **{**paths["train_scratch"], "out": tmp_path / "s", "plots": tmp_path / "s.csv"})
    run_stage("train_student", params, **{**paths["train_student"], "out": tmp_path / "d", "plots": tmp_path / "d.csv"})
    n_train = len(load_split(pipeline["root"] / "data/prepared", "train").y)
    scratch, student = fitted
    assert scratch == student and len(scratch) == pytest.approx(0.3 * n_train, abs=10)
    assert epoch_rows == [n_train, n_train]
    seen = {r.data.tags["pipeline.stage"]: r.data.metrics["labelled_samples"] for r in _runs(mlflow_store)}
    assert seen == {"train_scratch": len(scratch), "train_student": len(scratch)}


def test_finetuning_without_distillation_runs_on_hard_labels(pipeline, tmp_path, mlflow_store):
    params = write_params(tmp_path / "p.yaml", finetune={"distill": False})
    run_stage("finetune", params, **{**pipeline["paths"]["finetune"], "out": tmp_path / "ft",
                                     "plots": tmp_path / "ft.csv"})
    (run,) = _runs(mlflow_store)
    assert run.data.params["finetune.distill"] == "False"
    assert "pipeline.input.soft_labels" not in run.data.tags  # the teacher's logits were not read
    assert manifest.verify(tmp_path / "ft")


def test_scores_and_prune_rounds_use_only_the_train_labels_the_students_may_see(pipeline, tmp_path, untracked,
                                                                                monkeypatch):
    """With student.label_fraction < 1, every train sample whose label a loss reads downstream of the
    students (the criteria, the oracle on the train split, the re-scoring of a later prune round) is one
    of the labelled rows. Recorded in a file: the score stage's pieces run in forked workers. The train
    split, the oracle's too here, is read from its file once."""
    from kdprune import recipes, rounds, scoring
    from kdprune.data import labelled_subset

    used, read = tmp_path / "rows.txt", []
    monkeypatch.setattr(recipes, "load_split", lambda folder, name, real=recipes.load_split:
                        read.append(name) or real(folder, name))

    def recording(real):
        def materialise(split, *args, **kwargs):
            rows = torch.arange(len(split.y)) if split.rows is None else split.rows
            with open(used, "a") as f:
                f.write(" ".join(map(str, rows.tolist())) + "\n")
            return real(split, *args, **kwargs)
        return materialise

    monkeypatch.setattr(scoring, "materialise", recording(scoring.materialise))
    monkeypatch.setattr(rounds, "materialise", recording(rounds.materialise))
    params = write_params(tmp_path / "p.yaml", student={"label_fraction": 0.1},
                          score={"methods": ["taylor"], "oracle_split": "train"}, prune={"steps": 2})
    run_stage("score", params, **{**pipeline["paths"]["score"], "out": tmp_path / "scores",
                                  "agreement": tmp_path / "score.json", "plot": tmp_path / "score.png"})
    assert read == ["train"]
    run_stage("prune", params, **{**pipeline["paths"]["prune"], "scores": tmp_path / "scores",
                                  "out": tmp_path / "pruned", "plot": tmp_path / "prune.png"})
    train = load_split(pipeline["root"] / "data/prepared", "train")
    allowed = set(torch.nonzero(labelled_subset(train.y, 0.1, 0)).squeeze(1).tolist())
    calls = [set(map(int, line.split())) for line in used.read_text().splitlines()]
    assert len(calls) >= 3  # the criterion's sample, the oracle's, the second round's re-scoring
    assert all(rows <= allowed for rows in calls), [len(rows - allowed) for rows in calls]


def test_scoring_without_the_oracle_runs_clean(pipeline, tmp_path, untracked):
    params = write_params(tmp_path / "p.yaml", score={"oracle": False, "methods": ["l1", "taylor"]})
    paths = {**pipeline["paths"]["score"], "out": tmp_path / "scores", "agreement": tmp_path / "score.json",
             "plot": tmp_path / "score.png"}
    run_stage("score", params, **paths)
    assert json.loads((tmp_path / "score.json").read_text()) == []
    assert (tmp_path / "score.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["l1.pt", "manifest.json", "taylor.pt"]


def test_a_users_own_teacher_is_adopted_and_recorded_in_its_manifest(pipeline, tmp_path, untracked):
    from kdprune.files import sha256

    (tmp_path / "weights").mkdir()
    teacher, _ = load_model(pipeline["root"] / "models/teacher")
    torch.save(teacher.state_dict(), tmp_path / "weights/mine.pt")
    params = write_params(tmp_path / "p.yaml", teacher={"weights": "weights/mine.pt"})
    run_stage("train_teacher", params, **{**pipeline["paths"]["train_teacher"], "out": tmp_path / "t",
                                          "plots": tmp_path / "t.csv"})
    assert manifest.inputs_of(tmp_path / "t")["weights"] == sha256(tmp_path / "weights/mine.pt")
    adopted, _ = load_model(tmp_path / "t")
    for k, v in teacher.state_dict().items():
        assert torch.equal(adopted.state_dict()[k], v), k
    curve = (tmp_path / "t.csv").read_text().splitlines()
    assert curve[0] == "epoch,val_loss,val_accuracy" and len(curve) == 2


def test_a_wrong_shaped_teacher_stops_validate_naming_the_file_and_the_tensor(pipeline, tmp_path):
    from kdprune.errors import ParamsError  # noqa: F401  (the message comes from the checkpoint check)
    from tests.conftest import load_stage

    (tmp_path / "weights").mkdir()
    student, _ = load_model(pipeline["root"] / "models/student")
    torch.save(student.state_dict(), tmp_path / "weights/wrong.pt")
    params = write_params(tmp_path / "p.yaml", teacher={"weights": "weights/wrong.pt"})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        with pytest.raises(CheckpointError) as e:
            load_stage("validate").main(["--params", str(params), "--out", str(tmp_path / "ok")])
    assert str(e.value).startswith("weights/wrong.pt: tensor 'features.0.0.weight' has shape (4, 1, 3, 3), "
                                   "the architecture needs (8, 1, 3, 3)")
    assert not (tmp_path / "ok").exists()


def test_timings_that_cannot_be_written_are_a_warning_after_the_stage_not_its_error(tmp_path, monkeypatch, capsys):
    """KDPRUNE_TIMINGS is written last, after the outputs and the run's end (or the stage's own failure,
    which an error here would hide): a file that cannot be opened then is a warning naming it."""
    from kdprune import stage

    monkeypatch.setenv("KDPRUNE_TIMINGS", str(tmp_path))  # a folder, not a file
    stage._record_timings("prepare", dict.fromkeys(("entered", "torch", "work", "done", "waited"), 0.0))
    assert capsys.readouterr().err == (f"warning: KDPRUNE_TIMINGS: {tmp_path}: Is a directory; this stage's "
                                       "timings not recorded\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train_scratch", "score", "evaluate"])
def test_a_stage_interrupted_while_its_run_takes_its_outputs_leaves_every_one_as_it_was(
        name, pipeline, tmp_path, untracked, monkeypatch, capsys):
    """SIGTERM while `seal` (or evaluate's summary run) waited for MLflow: the files beside the folder (a
    curve, the agreement and its plot, evaluate's reports) were already replaced, and the stage said
    "no output written"."""
    from kdprune import stage, tracker

    paths = {key: tmp_path / path.relative_to(pipeline["root"]) if key in OUTPUTS[name] else path
             for key, path in pipeline["paths"][name].items()}
    for key in OUTPUTS[name]:  # the outputs a first run left, as the pipeline's
        src, dst = pipeline["paths"][name][key], paths[key]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    before = tree_bytes(tmp_path)
    params = write_params(tmp_path / "other.yaml", seed=1)  # other bytes everywhere, had they been written

    def interrupted(self, ident):
        raise stage.Terminated("signal 15")

    monkeypatch.setattr(tracker.Offline, "wait", interrupted)
    monkeypatch.setattr(tracker.Offline, "call", lambda self, op, **args: interrupted(self, 0))
    capsys.readouterr()
    assert guarded(lambda: run_stage(name, params, **paths), monkeypatch) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "error: interrupted; no output written"
    assert tree_bytes(tmp_path) == {**before, "other.yaml": (tmp_path / "other.yaml").read_bytes()}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []


OUTPUTS = {"train_scratch": ("out", "plots"), "score": ("out", "agreement", "plot"),
           "evaluate": ("headline", "metrics", "per_class", "report", "plot", "confusion")}
