"""Untrusted files: pickled payloads refused unrun, specs that lie refused, corrupt files named."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from kdprune.checkpoints import load_model, load_tensors, save_model
from kdprune.errors import CheckpointError
from kdprune.files import staged_dir, write_atomic
from kdprune.models import build_model
from tests.conftest import REPO

SPEC = {"arch": "cnn", "in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [4, 8], "hidden": [6]}


class Payload:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_model(tmp_path / "m", build_model(SPEC), SPEC)
    return tmp_path / "m"


def test_a_pickle_payload_is_refused_without_running_it(model_dir, tmp_path):
    sentinel = tmp_path / "pwned"
    state = torch.load(model_dir / "model.pt", weights_only=True)
    torch.save({**state, "extra": Payload(sentinel)}, model_dir / "model.pt")
    with pytest.raises(CheckpointError, match=re.escape(str(model_dir / "model.pt"))):
        load_model(model_dir)
    assert not sentinel.exists()


def test_an_unknown_architecture_in_spec_is_refused(model_dir):
    (model_dir / "spec.json").write_text(json.dumps({**SPEC, "arch": "transformer"}))
    with pytest.raises(CheckpointError, match=r"spec\.json: unknown architecture 'transformer'"):
        load_model(model_dir)


def test_widths_that_do_not_match_the_weights_are_refused(model_dir):
    (model_dir / "spec.json").write_text(json.dumps({**SPEC, "hidden": [7]}))
    with pytest.raises(CheckpointError, match=r"model\.pt: shapes of .* do not match the widths in .*spec\.json"):
        load_model(model_dir)


def test_a_truncated_model_file_is_named(model_dir):
    blob = (model_dir / "model.pt").read_bytes()
    (model_dir / "model.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(model_dir / "model.pt"))):
        load_model(model_dir)


def test_a_corrupt_spec_is_named(model_dir):
    (model_dir / "spec.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"spec\.json: cannot read JSON"):
        load_model(model_dir)


def test_missing_tensor_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_tensors(tmp_path / "absent.pt")


def test_staged_dir_leaves_the_old_output_whole_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed mid-stage")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    with staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("before")

    with pytest.raises(TypeError):  # the write itself fails half-way
        write_atomic(target, 12345)
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_no_code_runs_from_data_anywhere():
    """No eval/exec, no unsafe YAML, no pickle loading, no torch.load without weights_only."""
    banned = re.compile(r"(?<![.\w])(eval|exec)\(|yaml\.(unsafe_)?load\(|yaml\.Loader|pickle\.loads?\(|weights_only=False")
    for path in [*REPO.glob("src/kdprune/*.py"), *REPO.glob("stages/*.py")]:
        text = path.read_text()
        assert not banned.search(text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_outputs_get_the_modes_a_plain_open_would_give(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_atomic(tmp_path / "f.txt", "x")
    with staged_dir(tmp_path / "d") as out:
        (out / "g.txt").write_text("y")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
