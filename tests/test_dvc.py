"""The pipeline under DVC itself, in a throw-away clone: repro, no-op, a bad param, an experiment."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, stage_env, tree_bytes, write_params

RAN = re.compile(r"Running stage '(\w+)'")


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The repo's tracked files in a fresh git repo, with the tiny params, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.startswith((".dvc/", "stages/", "src/")) or name in ("dvc.yaml", ".dvcignore", ".gitignore"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    write_params(root / "params.yaml")
    env = stage_env(f"sqlite:///{root / 'mlflow.db'}")
    env["DVC_NO_ANALYTICS"] = "1"
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        _sh(cmd, root, env)
    out = _sh(["dvc", "repro"], root, env)
    assert RAN.findall(out.stdout) == ["validate", "prepare", "train_teacher", "soft_labels", "train_scratch",
                                       "train_student", "score", "prune", "finetune", "evaluate"]
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], root, env)
    return root, env


def test_a_second_repro_runs_nothing(project):
    root, env = project
    out = _sh(["dvc", "repro"], root, env)
    assert RAN.findall(out.stdout) == []
    assert "Data and pipelines are up to date" in out.stdout


def test_a_bad_param_fails_naming_the_key_and_leaves_models_byte_identical(project):
    root, env = project
    good = (root / "params.yaml").read_text()
    before = tree_bytes(root / "models")
    params = yaml.safe_load(good)
    params["prune"]["amount"] = 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _sh(["dvc", "repro"], root, env, check=False)
        assert out.returncode != 0
        assert "prune.amount: must be in [0.0, 1.0), got 1.5" in out.stdout + out.stderr
        assert tree_bytes(root / "models") == before
    finally:
        (root / "params.yaml").write_text(good)
    assert RAN.findall(_sh(["dvc", "repro"], root, env).stdout) == ["validate"]


def test_an_experiment_on_prune_amount_reruns_only_what_reads_it(project):
    root, env = project
    out = _sh(["dvc", "exp", "run", "-S", "prune.amount=0.7"], root, env)
    assert RAN.findall(out.stdout) == ["validate", "prune", "finetune", "evaluate"]
    assert yaml.safe_load((root / "params.yaml").read_text())["prune"]["amount"] == 0.7


def test_a_queued_sweep_with_two_workers_on_a_fresh_store_loses_no_run_and_trains_once(project):
    """Two experiments on a seed the baseline never ran, two workers, a brand-new default store: both
    summary runs land in `kdprune` with their own params, and each upstream stage runs once between them,
    although the two experiments reach it at the same time, before DVC's run-cache could help."""
    import time

    import mlflow

    root, env = project
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store, from temp copies
    (root / "mlflow.db").rename(root / "mlflow.old.db")
    _sh(["dvc", "exp", "run", "--queue", "-S", "prune.amount=0.6,0.8", "-S", "seed=1"], root, env)
    _sh(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        status = _sh(["dvc", "queue", "status"], root, env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    _sh(["dvc", "queue", "stop"], root, env, check=False)
    assert status.count("Success") == 2, status
    names = [line.split()[0] for line in status.splitlines() if "Success" in line]
    logs = "".join(_sh(["dvc", "queue", "logs", name], root, env).stdout for name in names)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "kdprune"]
    exp = client.get_experiment_by_name("kdprune")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    summaries = [r for r in runs if r.data.tags.get("pipeline.kind") == "summary"]
    assert sorted((r.data.params["prune.amount"], r.data.params["seed"]) for r in summaries) == [
        ("0.6", "1"), ("0.8", "1")]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags.get("dvc.exp_name") for r in summaries)
    stages = sorted(r.data.tags["pipeline.stage"] for r in runs if r.data.tags.get("pipeline.kind") == "stage")
    once = ["prepare", "train_teacher", "soft_labels", "train_scratch", "train_student", "score"]
    assert stages == sorted(once + ["prune", "finetune", "evaluate"] * 2), logs
    assert "reused the outputs of the identical" in logs  # the experiments did overlap
    default = client.get_experiment_by_name("Default")
    assert client.search_runs([default.experiment_id]) == []
    report = _sh(["kdprune", "report", "--out", str(root / "reports")], root, env).stdout
    assert [line.split(" | ")[1] for line in report.splitlines() if line.startswith("| 0.")] == ["1", "1"]
    assert (root / "reports/pareto.png").exists()
