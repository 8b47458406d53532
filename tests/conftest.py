"""Shared fixtures: a tiny params file, a private MLflow store, and stages run in-process."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The tests' own fork server and MLflow tracking services (kdprune.forkserver, kdprune.tracker), apart from
# any a developer runs beside them: one folder for the whole run, made by the process that starts it (the
# xdist controller, or pytest alone) and inherited by the rest (the workers, a child that imports a test
# module), so both workers share one fork server and one zygote (each costs 5-8 s of CPU to start); that
# process stops them once every worker is done (pytest_sessionfinish).
_RUN_SERVICES = "KDPRUNE_TEST_RUN_SERVICE_DIR"
OWNS_SERVICES = _RUN_SERVICES not in os.environ
if OWNS_SERVICES:
    os.environ[_RUN_SERVICES] = tempfile.mkdtemp(prefix="kdp-")
    # (also when a script imports the tests' helpers outside pytest, which has no session to end: it was left)
    atexit.register(shutil.rmtree, os.environ[_RUN_SERVICES], ignore_errors=True)
os.environ["KDPRUNE_SERVICE_DIR"] = os.environ[_RUN_SERVICES]
# One OpenMP thread for the models the tests run in-process (set before torch starts its pool): two xdist
# workers on two cores, each with a pool of two spinning threads, made small models 25x slower (make
# test-fast 151 s -> 79 s). Stages set their own count from params (`threads`); tests of threads set theirs.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The project's own smoke-test preset: the whole pipeline in seconds on 2 cores, on the real digits data.
TINY: dict[str, Any] = yaml.safe_load((REPO / "conf/preset/tiny.yaml").read_text())


def merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`layer` over `base`, section by section (nested sections too), as Hydra composes a preset."""
    out = dict(base)
    for key, value in layer.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def write_params(path: Path, **overrides: dict[str, Any]) -> Path:
    """params.yaml = the repo's, with the tiny preset and then `overrides` merged in per section."""
    with (REPO / "params.yaml").open() as f:
        params = yaml.safe_load(f)
    params = merge(merge(params, TINY), overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def load_stage(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(name: str, params: Path, **paths: Path) -> None:
    """stages/<name>.py main() in this process, with --params and --<path> options."""
    argv = ["--params", str(params)]
    for key, value in paths.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    load_stage(name).main(argv)


def guarded(main: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> int:
    """`stage.guard(main)` in this process, as a stage script's __main__ runs it: its exit status. The guard's
    hold on the process (its death with dvc's, its SIGTERM handler) is kept off pytest."""
    from kdprune import stage

    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setattr(stage, "_die_with_dvc", lambda: None)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            stage.guard(main)
    finally:
        signal.signal(signal.SIGTERM, handler)
    return e.value.code


def stage_paths(root: Path) -> dict[str, dict[str, Path]]:
    """The options each stage is given, as dvc.yaml wires them, under `root`."""
    d = {k: root / v for k, v in {
        "data": "data/prepared", "teacher": "models/teacher", "scratch": "models/student_scratch",
        "student": "models/student", "pruned": "models/pruned", "finetuned": "models/finetuned",
        "soft": "artifacts/soft_labels", "scores": "artifacts/scores"}.items()}
    return {
        "prepare": {"raw": root / "data/raw", "out": d["data"]},
        "train_teacher": {"data": d["data"], "out": d["teacher"], "plots": root / "plots/train_teacher.csv"},
        "soft_labels": {"data": d["data"], "teacher": d["teacher"], "out": d["soft"]},
        "train_scratch": {"data": d["data"], "out": d["scratch"], "plots": root / "plots/train_scratch.csv"},
        "train_student": {"data": d["data"], "soft_labels": d["soft"], "teacher": d["teacher"],
                          "out": d["student"], "plots": root / "plots/train_student.csv"},
        "score": {"data": d["data"], "student": d["student"], "out": d["scores"],
                  "agreement": root / "plots/score.json", "plot": root / "plots/score.png"},
        "prune": {"data": d["data"], "student": d["student"], "scores": d["scores"], "out": d["pruned"],
                  "plot": root / "plots/prune.png"},
        "finetune": {"data": d["data"], "pruned": d["pruned"], "soft_labels": d["soft"], "teacher": d["teacher"],
                     "out": d["finetuned"], "plots": root / "plots/finetune.csv"},
        "evaluate": {"data": d["data"], "teacher": d["teacher"], "student_scratch": d["scratch"],
                     "student": d["student"], "pruned": d["pruned"], "finetuned": d["finetuned"],
                     "headline": root / "metrics/headline.json", "metrics": root / "metrics/evaluate.json", "per_class": root / "metrics/per_class.json",
                     "report": root / "reports/comparison.md", "plot": root / "plots/tradeoff.png",
                     "confusion": root / "plots/confusion.png"},
    }


def randomised(spec: dict[str, Any], seed: int = 0) -> Any:
    """A model of `spec` in eval mode with non-trivial BatchNorm statistics, so BN gates matter."""
    import torch

    from kdprune.models import build_model

    torch.manual_seed(seed)
    model = build_model(spec).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


STAGES = list(stage_paths(Path(".")))


# The files that take longest, longest first: `make test` hands each xdist worker a file at a time in
# collection order, so starting with the longest (and filling in with the short ones) ends the two
# workers together. Any other file follows, in name order. Without workers (`pytest` alone) the files
# run in the order given, so that `pytest $(ls tests/test_*.py | sort -r)` checks they are independent.
LONGEST_FIRST = ("test_dvc.py", "test_team.py", "test_tracking.py", "test_forkserver.py", "test_architectures.py",
                 "test_stages.py", "test_importance.py", "test_data.py", "test_models.py", "test_params.py",
                 "test_sweep.py", "test_export.py", "test_readme.py", "test_training.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker (the workers collect; the controller deals)
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path.name))  # stable within a file


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Every tracking service, zygote and fork server the tests started is stopped at the end, by the
    process that made their folder, after the workers: no process outlives the tests."""
    if not OWNS_SERVICES:
        return
    from kdprune import forkserver, tracker

    os.environ["KDPRUNE_SERVICE_DIR"] = os.environ[_RUN_SERVICES]  # whatever a test left set
    tracker.stop_all()
    forkserver.stop_all()
    shutil.rmtree(os.environ[_RUN_SERVICES], ignore_errors=True)


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh sqlite store under tmp_path, and tmp_path as the working directory."""
    from kdprune import tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    yield uri
    tracker.stop(uri, "kdprune")


@pytest.fixture
def services() -> Iterator[Path]:
    """A folder of the test's own for its services (KDPRUNE_SERVICE_DIR), removed after it with every
    service, zygote and fork server still listening there (a zygote had outlived the tests by its idle
    time). Short, as tmp_path need not be: a socket's path has at most 107 bytes, and tmp_path's grows
    with the user's name and pytest's count of its runs."""
    from kdprune import forkserver, tracker

    folder = Path(tempfile.mkdtemp(prefix="kdp-"))
    yield folder
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPRUNE_SERVICE_DIR", str(folder))
        if folder.is_dir():
            tracker.stop_all()
            forkserver.stop_all()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def untracked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow run (KDPRUNE_TRACKING=off), tmp_path as the working directory: for a test of what a stage
    writes, which then starts no tracking service (seconds of MLflow's import and a new store each)."""
    monkeypatch.setenv("KDPRUNE_TRACKING", "off")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every stage run once, in order, on the tiny config: its root, params and MLflow URI."""
    root = tmp_path_factory.mktemp("pipeline")
    params = write_params(root / "params.yaml")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.chdir(root)
        for name, paths in stage_paths(root).items():
            run_stage(name, params, **paths)
    return {"root": root, "params": params, "uri": uri, "paths": stage_paths(root)}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to show that nothing was touched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stage_env(uri: str) -> dict[str, str]:
    """The environment for a stage run as a subprocess, with the venv's python first on PATH."""
    import sys

    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    return env


StageRunner = Callable[..., None]
