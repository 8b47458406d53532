"""Two experiments starting the same new stage at once compute it once (kdprune.sharing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdprune import sharing
from kdprune.params import load_params
from kdprune.stage import Reused
from tests.conftest import REPO, write_params

READS = ("seed", "teacher")


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A repo root with .dvc/tmp, an input directory with a manifest, params, inside `dvc exp run`."""
    from kdprune import manifest

    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"\x00\x01")
    manifest.write(data, "prepare", {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.delenv("KDPRUNE_SHARE", raising=False)
    return {"root": tmp_path, "data": data, "params": write_params(tmp_path / "params.yaml")}


def _compute(out: Path, curve: Path, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.pt").write_text(text)
    curve.write_text(text + " curve")


def test_a_sibling_restores_the_outputs_the_first_computed(workspace):
    p = load_params(workspace["params"])
    out, curve = workspace["root"] / "models/teacher", workspace["root"] / "plots/c.csv"
    curve.parent.mkdir()
    with sharing.once("train_teacher", p, READS, {"data": workspace["data"]}, [out, curve]):
        _compute(out, curve, "first")
    out.rename(workspace["root"] / "elsewhere")
    curve.unlink()
    with pytest.raises(Reused, match="restored the outputs of the identical train_teacher"):
        with sharing.once("train_teacher", p, READS, {"data": workspace["data"]}, [out, curve]):
            pytest.fail("computed again")
    assert (out / "model.pt").read_text() == "first" and curve.read_text() == "first curve"


def test_leaving_and_collecting_never_fail_a_stage_that_is_done(workspace, monkeypatch, capsys):
    """They run after the stage's run is closed FINISHED and its outputs are in place. Siblings collect at
    once: an entry one of them deleted, or one that cannot be read, had failed the stage ("entry.json: Is
    a directory"); outputs that cannot be left are a warning."""
    root = workspace["root"] / ".dvc/tmp/kdprune-shared"
    (root / "damaged/entry.json").mkdir(parents=True)
    (root / "being-written").mkdir()
    for name, age in (("old", sharing.KEEP + 60), ("new", 0)):
        (root / name).mkdir()
        (root / name / "entry.json").write_text(f'{{"stage": "prepare", "made": {time.time() - age}}}')
    p = load_params(workspace["params"])
    out, curve = workspace["root"] / "m", workspace["root"] / "c.csv"
    with sharing.once("train_teacher", p, READS, {"data": workspace["data"]}, [out, curve]):
        _compute(out, curve, "x")
    assert sorted(e.name for e in root.iterdir() if e.is_dir() and len(e.name) < 64) == [
        "being-written", "damaged", "new"]
    def full(*args: object) -> None:
        raise OSError(28, "No space left")

    monkeypatch.setattr(sharing, "_link_outputs", full)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    with sharing.once("train_teacher", p, ("seed",), {"data": workspace["data"]}, [out, curve]):
        _compute(out, curve, "y")
    assert capsys.readouterr().err == ("warning: train_teacher's outputs were not left for sibling experiments "
                                       "([Errno 28] No space left)\n")


def test_nothing_is_shared_outside_dvc_exp_run_or_with_kdprune_share_0(workspace, monkeypatch):
    p = load_params(workspace["params"])
    out, curve = workspace["root"] / "m", workspace["root"] / "c.csv"
    for env in ({"DVC_EXP_NAME": None}, {"KDPRUNE_SHARE": "0"}):
        for key, value in env.items():
            monkeypatch.delenv(key) if value is None else monkeypatch.setenv(key, value)
        for _ in range(2):
            ran = []
            with sharing.once("train_teacher", p, READS, {"data": workspace["data"]}, [out, curve]):
                ran.append(1)
                _compute(out, curve, "x")
            assert ran == [1]
        monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
        monkeypatch.delenv("KDPRUNE_SHARE", raising=False)
    assert not (workspace["root"] / ".dvc/tmp/kdprune-shared").exists() or not any(
        e.is_dir() for e in (workspace["root"] / ".dvc/tmp/kdprune-shared").iterdir())


def test_a_failed_holder_leaves_nothing_to_restore(workspace):
    p = load_params(workspace["params"])
    out, curve = workspace["root"] / "m", workspace["root"] / "c.csv"
    with pytest.raises(RuntimeError):
        with sharing.once("train_teacher", p, READS, {"data": workspace["data"]}, [out, curve]):
            _compute(out, curve, "partial")  # outputs there, then the failure: none of it is shared
            raise RuntimeError("boom")
    assert not any(e.is_dir() for e in sharing.store_dir().iterdir())
    ran = []
    with sharing.once("train_teacher", p, READS, {"data": workspace["data"]}, [out, curve]):
        ran.append(1)
        _compute(out, curve, "second")
    assert ran == [1] and (out / "model.pt").read_text() == "second"


def test_the_key_changes_with_the_params_read_the_inputs_and_the_code(workspace, monkeypatch):
    from kdprune import manifest

    p = load_params(workspace["params"])
    key = before = sharing.stage_key("train_teacher", p, READS, {"data": workspace["data"]})
    other = load_params(write_params(workspace["root"] / "p2.yaml", teacher={"epochs": 3}))
    assert sharing.stage_key("train_teacher", other, READS, {"data": workspace["data"]}) != key
    unread = load_params(write_params(workspace["root"] / "p3.yaml", prune={"amount": 0.9}))
    assert sharing.stage_key("train_teacher", unread, READS, {"data": workspace["data"]}) == key
    (workspace["data"] / "a.bin").write_bytes(b"\x02")
    manifest.write(workspace["data"], "prepare", {})
    assert (key := sharing.stage_key("train_teacher", p, READS, {"data": workspace["data"]})) != before
    # the code: a copy of the package and the stage script, edited one file at a time
    copy = workspace["root"] / "copy"
    shutil.copytree(REPO / "src/kdprune", copy / "src/kdprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "stages", copy / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sharing, "__file__", str(copy / "src/kdprune/sharing.py"))
    assert sharing.stage_key("train_teacher", p, READS, {"data": workspace["data"]}) == key
    for edited in (copy / "src/kdprune/models.py", copy / "stages/train_teacher.py"):
        original = edited.read_text()
        edited.write_text(original + "# edited\n")
        assert sharing.stage_key("train_teacher", p, READS, {"data": workspace["data"]}) != key, edited.name
        edited.write_text(original)


WAITER = """
import sys, time
from pathlib import Path
from kdprune import sharing
from kdprune.params import load_params
from kdprune.stage import Reused
out, curve = Path("m"), Path("c.csv")
if sys.argv[1] == "second":
    Path("arrived").write_text("")  # the first holds the lock and has left nothing yet
try:
    with sharing.once("train_teacher", load_params("params.yaml"), ("seed", "teacher"), {"data": Path("data")},
                      [out, curve]):
        if sys.argv[1] == "first":  # holds the lock until the test says so
            Path("holding").write_text("")
            while not Path("release").exists():
                time.sleep(0.02)
        out.mkdir(exist_ok=True)
        (out / "model.pt").write_text(sys.argv[1])
        curve.write_text(sys.argv[1])
    print("computed")
except Reused:
    print("reused")
"""


def test_a_twin_arriving_mid_computation_waits_and_takes_the_result(workspace):
    """The first holds the lock until the second has arrived (however slowly it starts): the second
    must wait, then restore what the first made."""
    root = workspace["root"]
    env = {"DVC_EXP_NAME": "exp", "DVC_ROOT": str(root), "PATH": "/usr/bin:/bin"}
    first = subprocess.Popen([sys.executable, "-c", WAITER, "first"], cwd=root, env=env, stdout=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not (root / "holding").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.Popen([sys.executable, "-c", WAITER, "second"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (root / "arrived").exists():
        assert second.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    (root / "release").write_text("")
    assert first.communicate(timeout=120)[0].strip() == "computed"
    out, err = second.communicate(timeout=120)
    assert out.strip() == "reused", err
    assert (workspace["root"] / "m/model.pt").read_text() == "first"


def test_the_summary_stage_is_never_shared_it_measures_and_owns_its_execution_s_summary_run(workspace, monkeypatch):
    """evaluate (kind "summary") computes in every experiment, even beside an identical sibling: its latency
    figures are measured, not a function of its inputs, and each pipeline execution needs its own summary
    run. The same stage.run as an ordinary stage is restored from the sibling instead."""
    from kdprune import stage

    monkeypatch.setenv("KDPRUNE_TRACKING", "off")
    p = load_params(workspace["params"])
    out = workspace["root"] / "report.md"
    ran = []
    for _ in range(2):
        with stage.run("evaluate", p, (), {"data": workspace["data"]}, {out: "file"}, kind="summary"):
            ran.append("evaluate")
            out.write_text(f"measured {len(ran)}")
    assert ran == ["evaluate", "evaluate"] and out.read_text() == "measured 2"
    with stage.run("train_teacher", p, READS, {"data": workspace["data"]}, {out: "file"}):
        out.write_text("computed")
    with pytest.raises(Reused):
        with stage.run("train_teacher", p, READS, {"data": workspace["data"]}, {out: "file"}):
            pytest.fail("computed again")
