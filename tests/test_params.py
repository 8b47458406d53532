"""params.yaml validation: every missing, unknown or bad key fails before any work, naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdprune import data, manifest
from kdprune.checkpoints import save_model
from kdprune.errors import ParamsError
from kdprune.models import build_model
from kdprune.params import SHAPES, check_machine, flatten, load_params
from tests.conftest import REPO, TINY, guarded, load_stage, merge, stage_env, tree_bytes, write_params

VALIDATE = load_stage("validate")
with (REPO / "params.yaml").open() as _f:
    REPO_PARAMS: dict[str, Any] = yaml.safe_load(_f)
TINY_PARAMS = merge(REPO_PARAMS, TINY)  # what write_params writes: the cases below edit it
PRESETS = sorted(p.stem for p in (REPO / "conf/preset").glob("*.yaml"))
DELETE = object()  # an edit that removes the key
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def key_paths(section: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of a params mapping, sections and leaves, as dotted paths ("prune", "prune.recover.lr")."""
    out = []
    for key, value in section.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out += key_paths(value, f"{prefix}{key}.")
    return out


def edited(edits: dict[str, Any], base: dict[str, Any] = TINY_PARAMS) -> dict[str, Any]:
    """`base` with each dotted key set to its value, or removed where the value is DELETE."""
    params = copy.deepcopy(base)
    for key, value in edits.items():
        *parents, leaf = key.split(".")
        node = params
        for name in parents:
            node = node[name]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return params


def write(path: Path, edit: bytes | str | dict[str, Any]) -> Path:
    """A params file: the bytes or text itself, or the tiny params with the edits applied."""
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        path.write_text(edit if isinstance(edit, str) else yaml.safe_dump(edited(edit), sort_keys=False))
    return path


def problems(path: Path) -> list[str]:
    """The lines of the ParamsError that load_params, then check_machine (as validate runs them), raise."""
    with pytest.raises(ParamsError) as e:
        check_machine(load_params(path), path)
    return str(e.value).splitlines()


def mlp(hidden: list[int]) -> dict[str, Any]:
    return {"arch": "mlp", "channels": [], "hidden": hidden}


def tv(arch: str) -> dict[str, Any]:
    return {"arch": arch, "channels": [], "hidden": [], "width": 1.0}


MISSING_TOP = [f"{key}: missing" for key in REPO_PARAMS]
REGISTRY_RULE = "(letters, digits, '.', '_' and '-', at most 256, starting with a letter or digit)"
ALL_CRITERIA = "l1, l2, taylor, hessian, fisher, activation, apoz, random"
OUTSIDE = "must be a file under weights/ (train_teacher depends on that folder), got"
NOT_SMALLER = "shrink student.channels, student.hidden or student.width"

# (the file's whole text, or edits of the tiny params; the exact lines of the error, without the file prefix)
BAD = [
    # the file as a whole
    pytest.param("", MISSING_TOP, id="empty-file"),
    pytest.param("seed: 0\n", [m for m in MISSING_TOP if m != "seed: missing"], id="only-seed"),
    pytest.param("[1, 2]\n", ["<top>: must be a mapping, got [1, 2]"], id="top-level-list"),
    pytest.param("seed: !!python/object/apply:os.system ['touch pwned']\n",
                 ["cannot read: could not determine a constructor for the tag "
                  "'tag:yaml.org,2002:python/object/apply:os.system' (line 1, column 7)"], id="yaml-tag-not-run"),
    pytest.param("prune: {amount: 0.5\n", ["cannot read: while parsing a flow mapping (line 2, column 1)"], id="yaml-syntax"),
    pytest.param("seed: 0\ndevice: cpu\nseed: 1\n", ["cannot read: duplicate key 'seed' (line 3, column 1)"],
                 id="yaml-duplicate-key"),
    pytest.param("seed: 0\n{a: 1}: 2\n", ["cannot read: a key that is a mapping, not a name (line 2, column 1)"],
                 id="yaml-mapping-as-key"),  # a TypeError's traceback: the duplicate check hashed it first
    pytest.param("? [a, b]\n: 1\n", ["cannot read: a key that is a list, not a name (line 1, column 3)"],
                 id="yaml-list-as-key"),
    pytest.param(b"# temp\xe9rature, in Latin-1\nseed: 0\n", ["cannot read: not UTF-8 text (byte 6: invalid "
                                                             "continuation byte)"], id="not-utf8"),
    # missing and unknown keys
    pytest.param({"score": DELETE}, ["score: missing"], id="score-section-deleted"),
    pytest.param({"prune": 0.5}, ["prune: must be a mapping, got 0.5"], id="section-not-a-mapping"),
    pytest.param({"bogus": 1}, ["bogus: unknown key (allowed: preset, seed, device, threads, data, augment, "
                                "teacher, student, distill, score, prune, finetune, evaluate)"], id="unknown-top"),
    pytest.param({"prune.recover.momentum": 0.9},
                 ["prune.recover.momentum: unknown key (allowed: epochs, batch_size, optimizer, lr, weight_decay)"],
                 id="unknown-nested"),
    pytest.param({"prune.amonut": 0.5, "prune.amount": DELETE},
                 ["prune.amonut: unknown key (allowed: criterion, amount, structured, scope, steps, round_to, "
                  "curves, recover)", "prune.amount: missing"], id="misspelt-key"),
    # numbers must be finite
    pytest.param({"distill.temperature": float("nan")}, ["distill.temperature: must be a finite number, got nan"],
                 id="temperature-nan"),
    pytest.param({"teacher.lr": float("nan")}, ["teacher.lr: must be a finite number, got nan"], id="lr-nan"),
    pytest.param({"prune.amount": float("nan")}, ["prune.amount: must be a finite number, got nan"], id="amount-nan"),
    pytest.param({"prune.amount": float("inf")}, ["prune.amount: must be a finite number, got inf"], id="amount-inf"),
    pytest.param({"prune.recover.lr": float("-inf")}, ["prune.recover.lr: must be a finite number, got -inf"],
                 id="recover-lr-minus-inf"),
    pytest.param({"distill.alpha": float("inf")}, ["distill.alpha: must be a finite number, got inf"],
                 id="alpha-inf"),
    # lists
    pytest.param({"score.methods": ["l1", "taylor", "l1"]},
                 ["score.methods: lists ['l1', 'taylor', 'l1'] with a duplicate"], id="methods-duplicated"),
    pytest.param({"evaluate.batch_sizes": [1, 256, 1]}, ["evaluate.batch_sizes: lists [1, 256, 1] with a duplicate"],
                 id="batch-sizes-duplicated"),
    pytest.param({"score.methods": ["l1", "nope"]},
                 [f"score.methods: must be a list of one of {ALL_CRITERIA}, got ['l1', 'nope']"], id="methods-unknown"),
    pytest.param({"score.methods": "taylor"},
                 [f"score.methods: must be a list of one of {ALL_CRITERIA}, got 'taylor'"], id="methods-not-a-list"),
    pytest.param({"evaluate.batch_sizes": 256}, ["evaluate.batch_sizes: must be a list of an integer, got 256"],
                 id="batch-sizes-not-a-list"),
    pytest.param({"evaluate.batch_sizes": [1, 64]},
                 ["evaluate.batch_sizes: must include 1 and 256 (the headline latencies), got [1, 64]"],
                 id="batch-sizes-without-256"),
    pytest.param({"student.hidden": [16, 0]}, ["student.hidden[1]: must be in [1, 16384], got 0"], id="hidden-zero"),
    # ranges and types
    pytest.param({"prune.amount": 1.0}, ["prune.amount: must be in [0.0, 1.0), got 1.0"], id="amount-one"),
    pytest.param({"prune.amount": -0.1}, ["prune.amount: must be in [0.0, 1.0), got -0.1"], id="amount-negative"),
    pytest.param({"prune.amount": "half"}, ["prune.amount: must be a number, got 'half'"], id="amount-string"),
    pytest.param({"distill.alpha": 1.5}, ["distill.alpha: must be in [0.0, 1.0], got 1.5"], id="alpha-above-one"),
    pytest.param({"distill.temperature": 0}, ["distill.temperature: must be in (0.0, 100.0], got 0"],
                 id="temperature-zero"),
    pytest.param({"teacher.epochs": "ten"}, ["teacher.epochs: must be an integer, got 'ten'"], id="epochs-string"),
    pytest.param({"teacher.epochs": True}, ["teacher.epochs: must be an integer, got True"], id="epochs-bool"),
    pytest.param({"teacher.batch_size": 1}, ["teacher.batch_size: must be in [2, 65536], got 1"],
                 id="batch-size-one"),
    pytest.param({"student.lr": 0.0}, ["student.lr: must be in (0.0, 10.0], got 0.0"], id="lr-zero"),
    pytest.param({"finetune.weight_decay": 2}, ["finetune.weight_decay: must be in [0.0, 1.0], got 2"],
                 id="weight-decay-above-one"),
    pytest.param({"finetune.optimizer": "rmsprop"}, ["finetune.optimizer: must be one of adam, sgd, got 'rmsprop'"],
                 id="optimizer-unknown"),
    pytest.param({"finetune.distill": "yes"}, ["finetune.distill: must be true or false, got 'yes'"],
                 id="bool-string"),
    pytest.param({"teacher.arch": "vgg"},
                 ["teacher.arch: must be one of cnn, mlp, resnet, resnet18, mobilenet_v2, vgg11_bn, got 'vgg'"],
                 id="arch-unknown"),
    pytest.param({"student.width": 0}, ["student.width: must be in (0.0, 1.0], got 0"], id="width-zero"),
    pytest.param({"student.width": 1.5}, ["student.width: must be in (0.0, 1.0], got 1.5"], id="width-above-one"),
    pytest.param({"student.label_fraction": 0}, ["student.label_fraction: must be in (0.0, 1.0], got 0"],
                 id="label-fraction-zero"),
    pytest.param({"student.l1": -1}, ["student.l1: must be in [0.0, 1.0], got -1"], id="l1-negative"),
    pytest.param({"data.name": "imagenet"},
                 ["data.name: must be one of digits, mnist, fashion_mnist, cifar10, got 'imagenet'"],
                 id="dataset-unknown"),
    pytest.param({"data.val_fraction": 0.6}, ["data.val_fraction: must be in (0.0, 0.5], got 0.6"],
                 id="val-fraction-above-half"),
    pytest.param({"data.val_fraction": 0.005},
                 ["data.val_fraction: 0.005 of digits's 1437 samples holds out 8, fewer than its 10 classes (a "
                  "stratified split needs one of each): use 0.007 or more"], id="val-fraction-fewer-than-classes"),
    pytest.param({"data.test_fraction": 0.004},
                 ["data.test_fraction: 0.004 of digits's 1797 samples holds out 8, fewer than its 10 classes (a "
                  "stratified split needs one of each): use 0.0056 or more"], id="test-fraction-fewer-than-classes"),
    pytest.param({"data.download": "no"}, ["data.download: must be true or false, got 'no'"], id="download-string"),
    pytest.param({"augment.crop": 1.5}, ["augment.crop: must be an integer, got 1.5"], id="crop-float"),
    pytest.param({"augment.crop": 65}, ["augment.crop: must be in [0, 64], got 65"], id="crop-too-big"),
    pytest.param({"seed": -1}, ["seed: must be in [0, 4294967295], got -1"], id="seed-negative"),
    pytest.param({"seed": 2**32}, ["seed: must be in [0, 4294967295], got 4294967296"], id="seed-too-big"),
    pytest.param({"threads": 0}, ["threads: must be in [1, 1024], got 0"], id="threads-zero"),
    pytest.param({"device": "tpu"}, ["device: must be one of auto, cpu, cuda, got 'tpu'"], id="device-unknown"),
    pytest.param({"preset": 5}, ["preset: must be a string, got 5"], id="preset-not-a-string"),
    pytest.param({"score.oracle_split": "test"}, ["score.oracle_split: must be one of train, val, got 'test'"],
                 id="oracle-split-test"),
    pytest.param({"score.probes": 0}, ["score.probes: must be in [1, 100000], got 0"], id="probes-zero"),
    pytest.param({"prune.scope": "world"}, ["prune.scope: must be one of global, layer, sensitivity, got 'world'"],
                 id="scope-unknown"),
    pytest.param({"prune.steps": 0}, ["prune.steps: must be in [1, 100], got 0"], id="steps-zero"),
    pytest.param({"prune.round_to": 0}, ["prune.round_to: must be in [1, 1024], got 0"], id="round-to-zero"),
    pytest.param({"evaluate.rounds": 2}, ["evaluate.rounds: must be in [3, 100000], got 2"], id="rounds-two"),
    pytest.param({"evaluate.max_accuracy_drop": 2}, ["evaluate.max_accuracy_drop: must be in [0.0, 1.0], got 2"],
                 id="accuracy-drop-above-one"),
    # cross-checks, each naming its key
    pytest.param({"score.methods": ["l1"]}, ["prune.criterion: 'taylor' is not among score.methods ['l1']"],
                 id="criterion-not-scored"),
    pytest.param({"prune.scope": "sensitivity", "prune.structured": False},
                 ["prune.scope: sensitivity spreads units across layers; it needs prune.structured: true"],
                 id="sensitivity-unstructured"),
    pytest.param({"evaluate.registered_model": "a/b"},
                 [f"evaluate.registered_model: 'a/b' is not a registry name {REGISTRY_RULE}"], id="registry-slash"),
    pytest.param({"evaluate.registered_model": "-x"},
                 [f"evaluate.registered_model: '-x' is not a registry name {REGISTRY_RULE}"], id="registry-dash"),
    pytest.param({"teacher.weights": "../teacher.pt"}, [f"teacher.weights: {OUTSIDE} '../teacher.pt'"],
                 id="weights-outside"),
    pytest.param({"teacher.weights": "/etc/passwd"}, [f"teacher.weights: {OUTSIDE} '/etc/passwd'"],
                 id="weights-absolute"),
    pytest.param({"teacher.weights": "weights/../teacher.pt"}, [f"teacher.weights: {OUTSIDE} 'weights/../teacher.pt'"],
                 id="weights-dotdot"),
    pytest.param({"teacher.weights": 5}, ["teacher.weights: must be a string or null, got 5"], id="weights-number"),
    pytest.param({"teacher.arch": "resnet18"},
                 ["teacher.channels: resnet18 is torchvision's: its shape comes from teacher.width; must be [], "
                  "got [8, 16]",
                  "teacher.hidden: resnet18 is torchvision's: its shape comes from teacher.width; must be [], "
                  "got [32]"], id="torchvision-with-channels"),
    pytest.param({"teacher.arch": "vgg11_bn", "teacher.channels": []},
                 ["teacher.hidden: vgg11_bn is torchvision's: its shape comes from teacher.width; must be [], "
                  "got [32]"], id="torchvision-with-hidden"),  # (it had named teacher.channels)
    pytest.param({"student.arch": "mlp", "student.channels": [4]},
                 ["student.channels: an mlp has no conv layers, must be [], got [4]"], id="mlp-with-channels"),
    pytest.param({"student": {**TINY_PARAMS["student"], **mlp([])}},
                 ["student.hidden: an mlp student needs a hidden layer: there is nothing else to prune"],
                 id="mlp-student-without-hidden"),
    pytest.param({"student.channels": []}, ["student.channels: a cnn needs at least one conv stage"],
                 id="cnn-without-channels"),
    pytest.param({"student.channels": [4, 4, 4, 4]},
                 ["student.channels: 4 pooling stages shrink digits's 8x8 images below one pixel"],
                 id="cnn-too-deep-for-digits"),
    # sizes counted on the meta device, and the machine (check_machine)
    pytest.param({"teacher.channels": [65536, 65536]},
                 [f"teacher.channels[{i}]: must be in [1, 4096], got 65536" for i in (0, 1)], id="channels-65536"),
    pytest.param({"teacher.channels": [4096, 4096]},
                 ["teacher: channels, hidden: the base cnn has 151,572,842 parameters, more than the "
                  "100,000,000 allowed"], id="model-too-big"),
    pytest.param({"teacher": {**TINY_PARAMS["teacher"], **mlp([32])},
                  "student": {**TINY_PARAMS["student"], **mlp([675])}},
                 [f"student: the student (50,635 parameters) is not smaller than its teacher (2,410): {NOT_SMALLER}"],
                 id="mlp-student-21x-teacher"),
    pytest.param({"student.channels": [16, 32]},
                 [f"student: the student (7,082 parameters) is not smaller than its teacher (3,682): {NOT_SMALLER}"],
                 id="cnn-student-wider"),
    pytest.param({"student": {**TINY_PARAMS["student"], **tv("resnet18")}},
                 [f"student: the student (11,172,810 parameters) is not smaller than its teacher (3,682): "
                  f"{NOT_SMALLER}"], id="torchvision-student-of-cnn-teacher"),
    pytest.param({"device": "cuda"}, ["device: cuda, but this machine has no CUDA device (use auto or cpu)"],
                 id="device-cuda", marks=NO_CUDA),
    pytest.param({"evaluate.device": "cuda"},
                 ["evaluate.device: cuda, but this machine has no CUDA device (use cpu)"],
                 id="evaluate-device-cuda", marks=NO_CUDA),
]
# run as a process too (the rest run in-process under stage.guard, as __main__ runs them): cases that fail in
# load_params, which needs no torch; a case failing in check_machine would add seconds of torch imports
SUBPROCESS = ["empty-file", "yaml-tag-not-run", "amount-nan", "unknown-nested", "misspelt-key"]


# ---------------------------------------------------------------- the repo's own params


def test_the_repo_params_are_valid_and_fit_this_machine() -> None:
    p = load_params(REPO / "params.yaml")
    check_machine(p, REPO / "params.yaml")  # raises on a problem
    assert p.prune.criterion in p.score.methods


def test_the_repo_params_are_the_composition_of_conf(tmp_path: Path) -> None:
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(REPO), [])
    assert yaml.safe_load(out.read_text()) == REPO_PARAMS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_into_valid_params(name: str, tmp_path: Path) -> None:
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(REPO), [f"preset={name}"])
    assert load_params(out).preset == name  # the label says which preset made the file


def test_kdprune_params_replaces_the_file_only_with_valid_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`kdprune params` composes and checks the file aside: a bad value stops it naming the key, and the
    params file it would have replaced is left as it was, with nothing beside it."""
    from kdprune import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "params.yaml"
    cli.main(["params", "preset=mnist", "--conf", str(REPO / "conf"), "--out", str(out)])
    good = out.read_bytes()
    assert load_params(out).preset == "mnist"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["params", "prune.amount=1.5", "--conf", str(REPO / "conf"), "--out", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"kdprune: error: {out}: prune.amount: must be in [0.0, 1.0), got 1.5\n"
    assert out.read_bytes() == good and [f.name for f in tmp_path.iterdir()] == ["params.yaml"]
    # what validate would refuse on any machine (it had been written: "the student is not smaller"), and every
    # problem on a line of its own, each with the prefix (only the first had it)
    for overrides, lines in ((["student.channels=[512,512]"], [f"{out}: student: the student ("]),
                             (["seed=-1", "prune.amount=2"], [f"{out}: seed: ", f"{out}: prune.amount: "])):
        with pytest.raises(SystemExit) as e:
            cli.main(["params", *overrides, "--conf", str(REPO / "conf"), "--out", str(out)])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == len(lines), err
        assert all(got.startswith(f"kdprune: error: {want}") for got, want in zip(err, lines)), err
        assert out.read_bytes() == good and [f.name for f in tmp_path.iterdir()] == ["params.yaml"]


# ---------------------------------------------------------------- what validate refuses


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A project directory holding what a tiny pipeline leaves, and its bytes: data/prepared and
    models/teacher (each with its manifest) and artifacts/params.ok."""
    root = tmp_path_factory.mktemp("workspace")
    params = write_params(root / "params.yaml")
    p = load_params(params)
    prepared = root / "data/prepared"
    data.prepare(p.data.name, root / "data/raw", prepared, p.data.val_fraction, p.data.test_fraction, p.seed,
                 p.data.download)
    manifest.write(prepared, "prepare", {})
    torch.manual_seed(0)
    teacher, spec = root / "models/teacher", p.teacher.spec(*SHAPES[p.data.name])
    save_model(teacher, build_model(spec), spec)
    manifest.write(teacher, "train_teacher", {"data": manifest.fingerprint(prepared)})
    VALIDATE.main(["--params", str(params), "--out", str(root / "artifacts/params.ok")])
    return root, tree_bytes(root)


def validate_in_process(params: Path, out: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """stages/validate.py as its __main__ runs it (under stage.guard) in this process: its exit code and
    stderr. The guard's hold on the process (parent-death signal, SIGTERM handler) is kept off pytest."""
    capsys.readouterr()
    code = guarded(lambda: VALIDATE.main(["--params", str(params), "--out", str(out)]), monkeypatch)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("key", key_paths(REPO_PARAMS))
def test_deleting_any_key_stops_validate_naming_it(key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(edited({key: DELETE}, base=REPO_PARAMS), sort_keys=False))
    assert problems(path) == [f"{path}: {key}: missing"]
    code_and_stderr = validate_in_process(path, tmp_path / "params.ok", capsys, monkeypatch)
    assert code_and_stderr == (2, f"error: {path}: {key}: missing\n")
    assert not (tmp_path / "params.ok").exists()


def test_there_are_at_least_40_bad_params_cases() -> None:
    assert len(BAD) >= 40  # the project's acceptance for "nothing wrong gets through"


@pytest.mark.parametrize("edit, lines", BAD)
def test_bad_params_stop_validate_naming_the_key(edit: bytes | str | dict[str, Any], lines: list[str], tmp_path: Path,
                                                 workspace: tuple[Path, dict[str, bytes]],
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, before = workspace
    monkeypatch.chdir(root)  # where a YAML tag that ran would leave its file
    bad = write(tmp_path / "params.yaml", edit)
    assert problems(bad) == [f"{bad}: {line}" for line in lines]
    code, err = validate_in_process(bad, tmp_path / "params.ok", capsys, monkeypatch)
    assert code == 2
    assert err == "".join(f"error: {bad}: {line}\n" for line in lines)
    assert not (tmp_path / "params.ok").exists()
    assert tree_bytes(root) == before  # nothing written, nothing run (no `pwned` file)


@pytest.mark.parametrize("edit, lines", [case for case in BAD if case.id in SUBPROCESS])
def test_bad_params_stop_the_validate_process_with_one_line_per_problem(
        edit: bytes | str | dict[str, Any], lines: list[str], tmp_path: Path,
        workspace: tuple[Path, dict[str, bytes]]) -> None:
    root, before = workspace
    bad = write(tmp_path / "params.yaml", edit)
    env = stage_env(f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("DVC_STAGE", None)  # as `dvc repro` would name another stage: no recovery hint
    proc = subprocess.run([sys.executable, str(REPO / "stages/validate.py"), "--params", str(bad),
                           "--out", str(tmp_path / "params.ok")], cwd=root, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "".join(f"error: {bad}: {line}\n" for line in lines)  # no traceback, no hint
    assert not (tmp_path / "params.ok").exists()
    assert tree_bytes(root) == before


@pytest.mark.parametrize("weights, message", [
    ("weights/absent.pt", "weights/absent.pt: no such file"),
    ("weights/student.pt", "weights/student.pt: tensor 'features.0.0.weight' has shape (4, 1, 3, 3), "
                           "the architecture needs (8, 1, 3, 3)"),
    ("weights/nan.pt", "weights/nan.pt: tensor 'features.0.0.weight' holds NaN or infinite values"),
    ("weights/sparse.pt", "weights/sparse.pt: tensor 'features.0.0.weight' is a torch.sparse_coo torch.float32 "
                          "tensor, the architecture needs a dense torch.float32 one"),
    ("weights/meta.pt", "weights/meta.pt: tensor 'features.0.0.weight' is a meta torch.strided torch.float32 "
                        "tensor, the architecture needs a dense torch.float32 one"),
])
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # torch's, loading the sparse one
def test_validate_refuses_teacher_weights_that_do_not_fit(weights: str, message: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What does not fit, and what fits in shape but would break train_teacher (a sparse or meta tensor:
    a traceback) or poison every model after it (NaN: the pipeline finished with NaN models, unsaid)."""
    p = load_params(write_params(tmp_path / "p.yaml"))
    student, teacher = (build_model(net.spec(*SHAPES["digits"])).state_dict() for net in (p.student, p.teacher))
    (tmp_path / "weights").mkdir()
    torch.save(student, tmp_path / "weights/student.pt")
    first = "features.0.0.weight"
    for name, tensor in (("nan", teacher[first].clone().fill_(float("nan"))), ("sparse", teacher[first].to_sparse()),
                         ("meta", teacher[first].to("meta"))):
        torch.save({**teacher, first: tensor}, tmp_path / f"weights/{name}.pt")
    params = write_params(tmp_path / "params.yaml", teacher={"weights": weights})
    load_params(params)  # the params themselves are fine: the file is what validate refuses
    monkeypatch.chdir(tmp_path)
    assert validate_in_process(params, tmp_path / "params.ok", capsys, monkeypatch) == (2, f"error: {message}\n")
    assert not (tmp_path / "params.ok").exists()


# ---------------------------------------------------------------- how problems are reported


def test_every_problem_is_listed_one_per_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "params.yaml", {"seed": -1, "prune.amount": 2, "prune.scope": "world",
                                           "evaluate.rounds": 0})
    assert problems(bad) == [f"{bad}: seed: must be in [0, 4294967295], got -1",
                             f"{bad}: prune.amount: must be in [0.0, 1.0), got 2",
                             f"{bad}: prune.scope: must be one of global, layer, sensitivity, got 'world'",
                             f"{bad}: evaluate.rounds: must be in [3, 100000], got 0"]


def test_a_resnet_deeper_than_its_images_are_wide_is_accepted_and_runs(tmp_path: Path) -> None:
    """A resnet's padded stride-2 convolutions keep at least one pixel: five stages on digits' 8x8 run (a
    cnn's pooling would leave none), and were refused ("shrink digits's 8x8 images below one pixel")."""
    p = load_params(write(tmp_path / "params.yaml", {"teacher.arch": "resnet", "teacher.channels": [8] * 5}))
    check_machine(p)
    assert build_model(p.teacher.spec(*SHAPES["digits"]))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_number_in_exponent_form_is_the_number_dvc_reads(tmp_path: Path) -> None:
    """`lr: 1e-3`, as a learning rate is usually written: PyYAML's YAML 1.1 reads it as text, and it was
    refused ("must be a number, got '1e-3'") where DVC's own reader, which `dvc params diff` and `dvc exp
    show` use, reads 0.001."""
    from dvc.utils.serialize import parse_yaml

    text = yaml.safe_dump(edited({"teacher.lr": "LR", "teacher.weight_decay": "WD"}), sort_keys=False)
    text = text.replace("lr: LR", "lr: 1e-3").replace("weight_decay: WD", "weight_decay: 5E-4")
    p = load_params(write(tmp_path / "params.yaml", text))
    dvc = parse_yaml(text, "params.yaml")["teacher"]
    assert (p.teacher.lr, p.teacher.weight_decay) == (dvc["lr"], dvc["weight_decay"]) == (0.001, 0.0005)


def test_a_decimal_written_as_a_whole_number_is_the_same_setting_as_the_decimal(tmp_path: Path) -> None:
    """`dvc exp run -S student.width=1` writes `width: 1`: kept an integer, it was logged as "1" beside the
    default's "1.0", and `kdprune report` showed one setting as two rows of one run each."""
    whole = load_params(write(tmp_path / "whole.yaml", {"student.width": 1, "distill.temperature": 4,
                                                        "prune.amount": 0}))
    decimal = load_params(write(tmp_path / "decimal.yaml", {"student.width": 1.0, "distill.temperature": 4.0,
                                                            "prune.amount": 0.0}))
    assert {k: repr(v) for k, v in flatten(whole).items()} == {k: repr(v) for k, v in flatten(decimal).items()}


def test_the_validate_marker_is_the_same_bytes_for_different_good_params(tmp_path: Path) -> None:
    goods = [write_params(tmp_path / "a.yaml"),
             write_params(tmp_path / "b.yaml", prune={"amount": 0.7, "steps": 3}, seed=5),
             write(tmp_path / "c.yaml", {"student.width": 0.5, "score.methods": ["taylor"], "augment.crop": 2})]
    markers = []
    for i, good in enumerate(goods):
        out = tmp_path / f"{i}.ok"
        VALIDATE.main(["--params", str(good), "--out", str(out)])
        markers.append(out.read_bytes())
    assert markers == [VALIDATE.MARKER.encode()] * 3  # a good change does not invalidate every stage
