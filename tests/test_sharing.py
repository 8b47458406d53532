"""Identical stages in experiments running side by side compute once (kdprune.sharing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdprune import sharing
from tests.conftest import REPO

DVC_YAML = """\
vars:
  - pkg: src
stages:
  fit:
    cmd: python fit.py
    deps:
      - ${pkg}/code.py
      - data
    params:
      - seed
      - teacher
      - other.yaml:
          - x.y
    outs:
      - model
    plots:
      - curve.csv:
          cache: false
"""


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src/code.py").write_text("print(1)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("seed: 0\nteacher: {epochs: 2}\nprune: {amount: 0.5}\n")
    (tmp_path / "other.yaml").write_text("x: {y: 1, z: 2}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_spec_of_a_real_stage_resolves_vars_and_lists_every_output(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = sharing.stage_spec("train_teacher")
    assert spec["outputs"] == ["models/teacher", "plots/train_teacher.csv"]
    assert "src/kdprune/trainer.py" in spec["deps"] and "data/prepared" in spec["deps"]
    assert spec["params"] == ["seed", "device", "teacher"]
    assert sharing.stage_spec("no_such_stage") is None


def test_the_key_follows_exactly_what_the_stage_reads(workspace):
    key = lambda: sharing.stage_key(sharing.stage_spec("fit"))  # noqa: E731
    base = key()
    (workspace / "params.yaml").write_text("seed: 0\nteacher: {epochs: 2}\nprune: {amount: 0.8}\n")
    (workspace / "other.yaml").write_text("x: {y: 1, z: 3}\n")
    assert key() == base  # prune.amount and x.z are not read
    changes = [("params.yaml", "seed: 1\nteacher: {epochs: 2}\n"), ("params.yaml", "seed: 0\nteacher: {epochs: 3}\n"),
               ("other.yaml", "x: {y: 2}\n"), ("src/code.py", "print(2)\n"), ("data/a.bin", "\x00\x02"),
               ("data/b.bin", "")]
    seen = {base}
    for name, text in changes:
        (workspace / name).write_text(text)
        seen.add(key())
    assert len(seen) == len(changes) + 1


WORKER = """
import os, sys, time
from pathlib import Path
from kdprune import sharing

ws, store, hold, keep = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
os.chdir(ws)

def compute():
    Path("started").write_text("")
    time.sleep(hold)
    if os.environ.get("FAIL"):
        raise RuntimeError("boom")
    Path("model").mkdir()
    Path("model/w.txt").write_text(f"made by {os.getpid()}")
    Path("curve.csv").write_text("epoch,loss\\n1,0.5\\n")

computed = sharing.run_once("fit", "k" * 64, ["model", "curve.csv"], compute, store, keep)
print("computed" if computed else "reused")
"""


def _worker(ws: Path, store: Path, hold: float = 0.0, keep: float = 60.0, fail: bool = False) -> subprocess.Popen:
    ws.mkdir(exist_ok=True)
    env = {**os.environ, "DVC_EXP_NAME": ws.name, **({"FAIL": "1"} if fail else {})}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(ws), str(store), str(hold), str(keep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_sibling_that_arrives_while_the_first_computes_waits_and_takes_its_outputs(tmp_path):
    store = tmp_path / "store"
    first = _worker(tmp_path / "exp-a", store, hold=2.0)
    _wait_for(tmp_path / "exp-a/started")
    second = _worker(tmp_path / "exp-b", store)
    out_a, out_b = first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]
    assert out_a.split()[-1] == "computed"
    assert "waiting for it" in out_b and "reused the outputs of the identical fit that experiment exp-a" in out_b
    assert out_b.split()[-1] == "reused"
    assert not (tmp_path / "exp-b/started").exists()  # never computed
    for rel in ("model/w.txt", "curve.csv"):
        assert (tmp_path / "exp-b" / rel).read_bytes() == (tmp_path / "exp-a" / rel).read_bytes()
    assert json.loads((store / ("k" * 64) / "entry.json").read_text())["experiment"] == "exp-a"


def test_a_later_experiment_reuses_what_an_earlier_one_left_until_it_is_too_old(tmp_path):
    store = tmp_path / "store"
    assert _worker(tmp_path / "exp-a", store).communicate(timeout=120)[0].split()[-1] == "computed"
    assert _worker(tmp_path / "exp-b", store).communicate(timeout=120)[0].split()[-1] == "reused"
    time.sleep(0.1)
    assert _worker(tmp_path / "exp-c", store, keep=0).communicate(timeout=120)[0].split()[-1] == "computed"
    assert (tmp_path / "exp-c/started").exists()
    assert (tmp_path / "exp-c/model/w.txt").read_text() != (tmp_path / "exp-a/model/w.txt").read_text()


def test_a_sibling_that_fails_leaves_nothing_to_reuse(tmp_path):
    store = tmp_path / "store"
    first = _worker(tmp_path / "exp-a", store, hold=1.0, fail=True)
    _wait_for(tmp_path / "exp-a/started")
    second = _worker(tmp_path / "exp-b", store)
    assert first.wait(timeout=120) != 0
    assert second.communicate(timeout=120)[0].split()[-1] == "computed"
    assert (tmp_path / "exp-b/model/w.txt").read_text() == f"made by {second.pid}"


@pytest.mark.parametrize("env", [{"DVC_EXP_NAME": None}, {"DVC_EXP_NAME": "exp-a", "KDPRUNE_SHARE": "0"}])
def test_outside_an_experiment_or_when_switched_off_a_stage_always_computes(workspace, monkeypatch, env):
    calls = []
    monkeypatch.setenv("DVC_STAGE", "fit")
    for name, value in env.items():
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sharing, "run_once", lambda *a, **k: pytest.fail("shared"))
    sharing.once(lambda: calls.append(1))()
    assert calls == [1]


def test_inside_an_experiment_a_stage_runs_under_its_key(workspace, monkeypatch):
    seen = []
    monkeypatch.setenv("DVC_STAGE", "fit")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.setattr(sharing, "store_dir", lambda: workspace / "store")
    monkeypatch.setattr(sharing, "run_once", lambda name, key, outputs, compute, store: seen.append(
        (name, key, outputs, store)))
    sharing.once(lambda: None)()
    assert seen == [("fit", sharing.stage_key(sharing.stage_spec("fit")), ["model", "curve.csv"],
                     workspace / "store")]
