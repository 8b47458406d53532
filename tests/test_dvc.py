"""The pipeline under DVC itself, in a throw-away clone: repro, no-op, a bad param, an experiment."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
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


def _run_queue(root: Path, env: dict[str, str], jobs: int, timeout: float) -> str:
    """`dvc queue start -j <jobs>`, wait until nothing is queued or running, return `dvc queue status`.

    DVC's primary worker sometimes lives on after the queue is empty ("monitor: shutting down due to
    empty queue", then nothing). So no pipe of ours is handed to the workers (we would wait on it
    forever), and any worker still alive at the end is killed.
    """
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _sh(["dvc", "queue", "status"], root, env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    _sh(["dvc", "queue", "stop"], root, env, check=False)
    for info in (root / ".dvc/tmp/exps/celery").glob("*.json"):
        pid = json.loads(info.read_text()).get("pid")
        with contextlib.suppress(OSError):
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    return status


def test_a_queued_grid_with_two_workers_on_a_fresh_store_loses_no_run_and_trains_once_per_seed(project):
    """The issue's acceptance in small: a 2x2 grid over prune.amount and seed, two workers, a brand-new
    default store and no DVC cache (as on a fresh clone; removed here, so this test runs last). Four
    summary runs land in `kdprune`, each with its own params, and every upstream stage runs once per
    seed: for the committed seed DVC's run-cache cannot help (it looks only for dvc.lock's outputs,
    which are not in the cache), and experiments of one seed may run at the same time."""
    import mlflow

    root, env = project
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store, from temp copies
    (root / "mlflow.db").rename(root / "mlflow.old.db")
    shutil.rmtree(root / ".dvc/cache")
    _sh(["dvc", "exp", "run", "--queue", "-S", "prune.amount=0.6,0.8", "-S", "seed=0,1"], root, env)
    status = _run_queue(root, env, jobs=2, timeout=900)
    assert status.count("Success") == 4, status
    tasks = [line.split()[0] for line in status.splitlines() if "Success" in line]
    logs = "".join(_sh(["dvc", "queue", "logs", task], root, env).stdout for task in tasks)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "kdprune"]
    exp = client.get_experiment_by_name("kdprune")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert all(r.info.status == "FINISHED" for r in runs)
    summaries = [r for r in runs if r.data.tags.get("pipeline.kind") == "summary"]
    assert sorted((r.data.params["prune.amount"], r.data.params["seed"]) for r in summaries) == [
        ("0.6", "0"), ("0.6", "1"), ("0.8", "0"), ("0.8", "1")]
    assert all(r.data.tags.get("dvc.exp_name") for r in summaries)
    stages = sorted(r.data.tags["pipeline.stage"] for r in runs if r.data.tags.get("pipeline.kind") == "stage")
    once = ["prepare", "train_teacher", "soft_labels", "train_scratch", "train_student", "score"]
    assert stages == sorted(once * 2 + ["prune", "finetune", "evaluate"] * 4), logs
    teachers = sorted(r.data.params["seed"] for r in runs if r.data.tags.get("pipeline.stage") == "train_teacher")
    assert teachers == ["0", "1"]
    assert "reused the outputs of the identical" in logs
    default = client.get_experiment_by_name("Default")
    assert client.search_runs([default.experiment_id]) == []
    report = _sh(["kdprune", "report", "--out", str(root / "reports")], root, env).stdout
    assert [line.split(" | ")[1] for line in report.splitlines() if line.startswith("| 0.")] == ["2", "2"]
    assert (root / "reports/pareto.png").exists()
