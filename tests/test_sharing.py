"""Two experiments starting the same new stage at once compute it once (kdprune.sharing)."""

from __future__ import annotations

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
            raise RuntimeError("boom")
    ran = []
    with sharing.once("train_teacher", p, READS, {"data": workspace["data"]}, [out, curve]):
        ran.append(1)
        _compute(out, curve, "second")
    assert ran == [1]


def test_the_key_changes_with_the_params_read_the_inputs_and_the_code(workspace, monkeypatch):
    from kdprune import manifest

    p = load_params(workspace["params"])
    key = sharing.stage_key("train_teacher", p, READS, {"data": workspace["data"]})
    other = load_params(write_params(workspace["root"] / "p2.yaml", teacher={"epochs": 3}))
    assert sharing.stage_key("train_teacher", other, READS, {"data": workspace["data"]}) != key
    unread = load_params(write_params(workspace["root"] / "p3.yaml", prune={"amount": 0.9}))
    assert sharing.stage_key("train_teacher", unread, READS, {"data": workspace["data"]}) == key
    (workspace["data"] / "a.bin").write_bytes(b"\x02")
    manifest.write(workspace["data"], "prepare", {})
    assert sharing.stage_key("train_teacher", p, READS, {"data": workspace["data"]}) != key


WAITER = """
import sys, time
from pathlib import Path
from kdprune import sharing
from kdprune.params import load_params
from kdprune.stage import Reused
out, curve = Path("m"), Path("c.csv")
try:
    with sharing.once("train_teacher", load_params("params.yaml"), ("seed", "teacher"), {"data": Path("data")},
                      [out, curve]):
        if sys.argv[1] == "first":
            Path("holding").write_text("")
            time.sleep(3)
        out.mkdir(exist_ok=True)
        (out / "model.pt").write_text(sys.argv[1])
        curve.write_text(sys.argv[1])
    print("computed")
except Reused:
    print("reused")
"""


def test_a_twin_arriving_mid_computation_waits_and_takes_the_result(workspace):
    env = {"DVC_EXP_NAME": "exp", "DVC_ROOT": str(workspace["root"]), "PATH": "/usr/bin:/bin"}
    first = subprocess.Popen([sys.executable, "-c", WAITER, "first"], cwd=workspace["root"], env=env,
                             stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (workspace["root"] / "holding").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", WAITER, "second"], cwd=workspace["root"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert first.communicate(timeout=60)[0].strip() == "computed"
    assert second.stdout.strip() == "reused", second.stderr
    assert (workspace["root"] / "m/model.pt").read_text() == "first"
