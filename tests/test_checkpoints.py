"""Untrusted files: pickled payloads refused unrun, specs that lie refused, corrupt files named."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from kdprune import files, manifest
from kdprune.checkpoints import check_state_dict, load_model, load_tensors, save_model
from kdprune.errors import CheckpointError
from kdprune.files import check_writable, staged, staged_dir, write_atomic
from kdprune.models import build_model, remove_units
from tests.conftest import REPO, guarded, tree_bytes
from tests.test_models import SPECS, half, tiny

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


def test_a_pickled_pruned_torchvision_model_is_refused_without_running_it(tmp_path):
    """A "pruned mobilenet_v2" that is really a pickled nn.Module, carrying a payload."""
    model = tiny("mobilenet_v2")
    remove_units(model, half(model))
    save_model(tmp_path / "m", model, SPECS["mobilenet_v2"])
    sentinel = tmp_path / "pwned"
    model.payload = Payload(sentinel)  # unpickled with the module, it would run
    torch.save(model, tmp_path / "m" / "model.pt")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "m" / "model.pt")) + ": refused"):
        load_model(tmp_path / "m")
    assert not sentinel.exists()


def test_an_unknown_architecture_in_spec_is_refused(model_dir):
    (model_dir / "spec.json").write_text(json.dumps({**SPEC, "arch": "transformer"}))
    with pytest.raises(CheckpointError, match=r"spec\.json: arch: unknown architecture 'transformer'"):
        load_model(model_dir)


@pytest.mark.parametrize("width", [-1, 10**10, 9, "4"])
def test_a_width_out_of_bounds_in_spec_is_named(model_dir, width):
    spec = json.loads((model_dir / "spec.json").read_text())
    (model_dir / "spec.json").write_text(json.dumps({**spec, "widths": {**_widths(spec), "features.0.0": width}}))
    with pytest.raises(CheckpointError, match=r"spec\.json: widths\.features\.0\.0: "):
        load_model(model_dir)


def _widths(spec: dict) -> dict:
    """The spec's widths; a model at its base widths is saved without them: read them off its units."""
    from kdprune.models import build_model, units

    return spec.get("widths") or {u.name: u.size for u in units(build_model(spec))}


def test_an_unpruned_model_is_saved_without_widths_and_a_pruned_one_with_them(model_dir, tmp_path):
    from kdprune.checkpoints import save_model
    from kdprune.models import units
    from kdprune.pruning import remove_units

    model, spec = load_model(model_dir)
    assert "widths" not in spec
    first = units(model)[0]
    remove_units(model, {first.name: [0]})
    save_model(tmp_path / "pruned", model, spec)
    again, pruned_spec = load_model(tmp_path / "pruned")
    assert pruned_spec["widths"][first.name] == first.size - 1
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_widths_that_do_not_match_the_weights_name_the_first_tensor(model_dir):
    spec = json.loads((model_dir / "spec.json").read_text())
    (model_dir / "spec.json").write_text(json.dumps({**spec, "widths": {**_widths(spec), "features.1.0": 5}}))
    with pytest.raises(CheckpointError, match=re.escape(f"{model_dir / 'model.pt'}: tensor 'features.1.0.weight' "
                                                        "has shape (8, 4, 3, 3), the architecture needs (5, 4, 3, 3)")):
        load_model(model_dir)


def test_check_state_dict_names_the_first_mismatching_missing_or_unexpected_tensor():
    model = build_model(SPEC)
    state = model.state_dict()
    check_state_dict(model, state, "t.pt")  # fits
    bad = {**state, "features.1.1.weight": torch.zeros(3), "classifier.0.0.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=re.escape("t.pt: tensor 'features.1.1.weight' has shape (3,), "
                                                        "the architecture needs (8,)")):
        check_state_dict(model, bad, "t.pt")
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match=re.escape("t.pt: tensor 'head.bias' is missing, the architecture "
                                                        "needs (10,)")):
        check_state_dict(model, missing, "t.pt")
    with pytest.raises(CheckpointError, match="t.pt: tensor 'extra' is unexpected"):
        check_state_dict(model, {**state, "extra": torch.zeros(1)}, "t.pt")
    with pytest.raises(CheckpointError, match="t.pt: tensor 'head.weight' has shape no tensor but a str"):
        check_state_dict(model, {**state, "head.weight": "x"}, "t.pt")


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


def test_a_file_added_to_a_stage_s_folder_is_refused_naming_it(tmp_path):
    """verify checked the files the manifest lists and no others: a masks.pt dropped into a structured
    prune's folder passed, with the folder's fingerprint unchanged, and finetune applied it (all zeros: a
    model at chance, recorded as made from the real one)."""
    out = tmp_path / "pruned"
    (out / "sub").mkdir(parents=True)
    (out / "model.pt").write_bytes(b"weights")
    (out / "sub" / "x.json").write_text("{}")
    fingerprint = manifest.write(out, "prune", {})
    assert manifest.verify(out) == fingerprint
    (out / "masks.pt").write_bytes(b"zeros")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(out / 'masks.pt'))}: not listed in "
                                              rf"{re.escape(str(out / 'manifest.json'))}"):
        manifest.verify(out)


def test_a_manifest_without_a_mapping_of_inputs_is_named(tmp_path):
    """`"inputs": null` stopped prune with a TypeError's traceback."""
    out = tmp_path / "scores"
    out.mkdir()
    manifest.write(out, "score", {"student": "0" * 64})
    record = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**record, "inputs": None}))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(out / 'manifest.json'))}: not a kdprune "
                                              r"manifest \(no 'inputs' mapping\)$"):
        manifest.inputs_of(out)


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


def test_staged_dir_interrupted_between_its_two_renames_leaves_the_old_output(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM between moving the old output aside and the new one in had left neither (the old
    one as a `.old` sibling the next run deleted)."""
    import kdprune.files as files

    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new output's move in
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), staged_dir(out) as tmp:
        (tmp / "f").write_text("new")
    monkeypatch.undo()
    assert (out / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_outputs_replace_the_old_ones_together_or_not_at_all(tmp_path, monkeypatch):
    """A curve written in place before the model folder was: a failure between the two had left the new
    curve beside the old model. Now every output waits for the end of the block, and an error on the way
    puts back what it had set aside (an output that was not there before is not left there either)."""
    model, curve, fresh = tmp_path / "models" / "m", tmp_path / "plots" / "m.csv", tmp_path / "plots" / "new.png"
    model.mkdir(parents=True)
    (model / "model.pt").write_text("old model")
    curve.parent.mkdir()
    curve.write_text("old curve")
    outputs = {model: "folder", curve: "file", fresh: "file"}
    before = tree_bytes(tmp_path)

    def write(new):
        (new[model] / "model.pt").write_text("new model")
        new[curve].write_text("new curve")
        new[fresh].write_text("new plot")
        assert new[curve].name == "m.csv"  # what is logged from it keeps its name

    with pytest.raises(RuntimeError), staged(outputs) as new:
        write(new)
        raise RuntimeError("the store went down while the run took the model")
    assert tree_bytes(tmp_path) == before and sorted(p.name for p in tmp_path.rglob("*")) == \
        ["m", "m.csv", "model.pt", "models", "plots"]
    replace = os.replace

    def fails_on_the_last(src, dst):  # the third output's twin: after the other two are in place
        if Path(dst) == fresh:
            raise OSError(28, "No space left on device", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fails_on_the_last)
    with pytest.raises(OSError, match="No space left"), staged(outputs) as new:
        write(new)
    assert tree_bytes(tmp_path) == before and sorted(p.name for p in tmp_path.rglob("*")) == \
        ["m", "m.csv", "model.pt", "models", "plots"]
    monkeypatch.setattr(os, "replace", replace)
    with staged(outputs) as new:
        write(new)
    assert tree_bytes(tmp_path) == {"models/m/model.pt": b"new model", "plots/m.csv": b"new curve",
                                    "plots/new.png": b"new plot"}


class Stop(Exception):
    """What a stage's SIGTERM handler raises (stage.Terminated), in a test that must not be stopped by it."""


def _signalled_between(monkeypatch, first: Path) -> None:
    """os.replace, and a SIGTERM to this process once `first` is in place."""
    replace = os.replace

    def signalled(src, dst):
        replace(src, dst)
        if Path(dst) == first:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", signalled)


@pytest.mark.parametrize("threads", [0, 1])
def test_a_signal_while_staged_outputs_go_in_place_waits_until_the_last_is_there(tmp_path, monkeypatch, threads):
    """Held by the main thread's signal mask, a SIGTERM was raised as the mask came off, before `replaced` was
    set (the stage said "no output written"), or, with another thread to take it (dvc's watchdog), in the
    middle: the outputs rolled back, or all new with their old copies left beside them."""
    model, curve = tmp_path / "m", tmp_path / "m.csv"
    model.mkdir()
    (model / "f").write_text("old")
    curve.write_text("old")
    monkeypatch.setattr(files, "replaced", [])
    _signalled_between(monkeypatch, model)
    done = threading.Event()
    others = [threading.Thread(target=done.wait) for _ in range(threads)]
    def stop(signum, frame):
        raise Stop

    handler = signal.signal(signal.SIGTERM, stop)
    try:
        for t in others:
            t.start()
        with pytest.raises(Stop), staged({model: "folder", curve: "file"}) as new:
            (new[model] / "f").write_text("new")
            new[curve].write_text("new")
    finally:
        signal.signal(signal.SIGTERM, handler)
        done.set()
        for t in others:
            t.join()
    assert ((model / "f").read_text(), curve.read_text()) == ("new", "new")
    assert files.replaced == [model, curve]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.csv"]


def test_a_stage_interrupted_once_its_outputs_are_in_place_says_so(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.md"

    def main():
        with staged({out: "file"}) as new:
            new[out].write_text("new")

    _signalled_between(monkeypatch, out)
    assert guarded(main, monkeypatch) == 130 and out.read_text() == "new"
    assert capsys.readouterr().err == ("error: interrupted; its outputs were in place, but unrecorded: "
                                       "`dvc repro` runs it again\n")


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("before")

    with pytest.raises(TypeError):  # the write itself fails half-way
        write_atomic(target, 12345)
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_write_atomic_writes_any_name_a_file_may_have_and_names_the_file_it_could_not_write(tmp_path):
    (tmp_path / "a folder").mkdir()
    with pytest.raises(IsADirectoryError) as e:  # the rename fails
        write_atomic(tmp_path / "a folder", "x")
    assert e.value.filename == str(tmp_path / "a folder")
    too_long = tmp_path / ("n" * 251 + ".json")  # 256 bytes: no file may have that name
    with pytest.raises(OSError) as e:
        write_atomic(too_long, "x")
    assert e.value.filename == str(too_long)
    assert [p.name for p in tmp_path.iterdir()] == ["a folder"] and not list((tmp_path / "a folder").iterdir())
    longest = tmp_path / ("n" * 250 + ".json")  # 255 bytes: a file may, its temporary too
    write_atomic(longest, "x")
    assert longest.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a folder", longest.name]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_check_writable_refuses_what_would_fail_or_replace_the_wrong_thing_and_nothing_else(tmp_path, kind):
    """What a stage's outputs are checked by before its work. Refused: a path under a file (either writer
    fails), a folder where a file goes (write_atomic fails), a file where a folder goes (staged_dir would
    replace it: `--out params.yaml` by mistake). Accepted, and then written: a new path, in new folders
    too, and one that holds an output of its kind."""
    def write(path):
        if kind == "file":
            write_atomic(path, "x")
        else:
            with staged_dir(path) as out:
                (out / "f").write_text("x")

    (tmp_path / "a_file").write_text("keep")
    (tmp_path / "a_folder").mkdir()
    refused = {tmp_path / "a_file" / "out": f"{tmp_path / 'a_file'} is not a folder",
               tmp_path / "a_file" / "deeper" / "out": f"{tmp_path / 'a_file'} is not a folder",
               tmp_path / ("a_folder" if kind == "file" else "a_file"):
                   f"a {'folder' if kind == 'file' else 'file'} is where this stage writes a {kind}"}
    for path, why in refused.items():
        with pytest.raises(OSError) as e:
            check_writable(path, kind)
        assert (e.value.filename, e.value.strerror) == (str(path), f"cannot write here ({why})")
    assert (tmp_path / "a_file").read_text() == "keep"
    for path in (tmp_path / "new", tmp_path / "new_folder" / "deeper" / "new", tmp_path / "new"):
        check_writable(path, kind)  # the last: over the output the first write made
        write(path)


def test_no_code_runs_from_data_anywhere():
    """No eval/exec, no unsafe YAML, no pickle loading, no torch.load without weights_only."""
    banned = re.compile(r"(?<![.\w])(eval|exec)\(|yaml\.(unsafe_)?load(_all)?\(|yaml\.(Unsafe|Full)?Loader|"
                        r"\bpickle\b|\bdill\b|\bmarshal\b|weights_only=False")
    paths = [*REPO.glob("src/kdprune/*.py"), *REPO.glob("stages/*.py"), *REPO.glob("bench/*.py"),
             *REPO.glob("scripts/*.py")]
    assert len(paths) > 20
    for path in paths:
        text = path.read_text()
        assert not banned.search(text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_modes_a_plain_open_would_give(tmp_path, umask):
    """Under the umask of the process that writes them (read once, at import: a process of its own)."""
    code = ("import sys; from pathlib import Path; from kdprune.files import staged_dir, write_atomic\n"
            "root = Path(sys.argv[1]); write_atomic(root / 'f.txt', 'x')\n"
            "with staged_dir(root / 'd') as out: (out / 'g.txt').write_text('y')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, preexec_fn=lambda: os.umask(umask))
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
