"""params.yaml validation: every bad key or value fails before any work, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdprune.errors import ParamsError
from kdprune.params import load_params
from tests.conftest import REPO, stage_env, tree_bytes, write_params


def _with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_the_repo_defaults_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.prune.criterion in p.score.methods and p.prune.structured


@pytest.mark.parametrize("text, message", [
    ("prune: {amount: 1.5}", "prune.amount: must be in [0.0, 1.0), got 1.5"),
    ("prune: {amount: -0.1}", "prune.amount: must be in [0.0, 1.0), got -0.1"),
    ("prune: {amount: 1.0}", "prune.amount: must be in [0.0, 1.0), got 1.0"),
    ("prune: {criterion: magic}", "prune.criterion: must be one of l1, l2, taylor"),
    ("prune: {amonut: 0.5}", "prune.amonut: unknown key (allowed: criterion, amount"),
    ("bogus: 1", "bogus: unknown key"),
    ("distill: {alpha: 1.5}", "distill.alpha: must be in [0.0, 1.0], got 1.5"),
    ("distill: {temperature: 0}", "distill.temperature: must be in (0.0, 100.0]"),
    ("teacher: {epochs: ten}", "teacher.epochs: must be an integer, got 'ten'"),
    ("teacher: {epochs: true}", "teacher.epochs: must be an integer, got True"),
    ("teacher: {arch: vgg}", "teacher.arch: must be one of cnn, mlp"),
    ("student: {hidden: [64, 0]}", "student.hidden: must be in [1, 65536], got 0"),
    ("student: {channels: [32, 256]}", "student.channels: the student is wider than its teacher"),
    ("score: {methods: [l1, nope]}", "score.methods: must be a list of one of l1, l2"),
    ("score: {methods: [l1]}", "prune.criterion: 'taylor' is not among score.methods ['l1']"),
    ("data: {name: imagenet}", "data.name: must be one of digits, mnist, fashion_mnist, cifar10"),
    ("prune: 0.5", "prune: must be a mapping, got 0.5"),
    ("prune: {scope: sensitivity, structured: false}", "prune.scope: sensitivity spreads units across layers"),
    ("evaluate: {batch_sizes: [1, 64]}", "evaluate.batch_sizes: must include 1 and 256"),
    ("student: {channels: [4, 4, 4, 4]}", "student.channels: 4 downsampling stages shrink digits's 8x8 images"),
    ("student: {arch: mlp, channels: [], hidden: []}", "student.hidden: an mlp student needs a hidden layer"),
    ("evaluate: {registered_model: ''}", "evaluate.registered_model: must name a registered model"),
    ("student: {l1: -1}", "student.l1: must be in [0.0, 1.0], got -1"),
    ("student: {label_fraction: 0}", "student.label_fraction: must be in (0.0, 1.0], got 0"),
    ("evaluate: {batch_sizes: 256}", "evaluate.batch_sizes: must be a list of an integer, got 256"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError) as e:
        load_params(_with(tmp_path, text))
    assert message in str(e.value)
    assert all(line.startswith(str(tmp_path / "params.yaml")) for line in str(e.value).splitlines())


def test_every_problem_is_listed_one_per_line(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(_with(tmp_path, "prune: {amount: 2, scope: world}\nseed: -1"))
    assert len(str(e.value).splitlines()) == 3


def test_yaml_tags_cannot_build_objects(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(_with(tmp_path, "seed: !!python/object/apply:os.system ['true']"))


def test_a_bad_value_stops_a_stage_before_any_work_and_leaves_outputs_untouched(pipeline, tmp_path):
    root = pipeline["root"]
    bad = write_params(tmp_path / "bad.yaml", prune={"amount": 1.5})
    before = tree_bytes(root / "models")
    paths = pipeline["paths"]["prune"]
    argv = [f"--{k}={v}" for k, v in paths.items()]
    out = subprocess.run([sys.executable, str(REPO / "stages/prune.py"), "--params", str(bad), *argv],
                         capture_output=True, text=True, env=stage_env(pipeline["uri"]), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {bad}: prune.amount: must be in [0.0, 1.0), got 1.5"]
    assert tree_bytes(root / "models") == before


def test_the_validate_stage_writes_a_constant_marker(tmp_path):
    from tests.conftest import load_stage

    validate = load_stage("validate")
    first, second = tmp_path / "a.ok", tmp_path / "b.ok"
    validate.main(["--params", str(write_params(tmp_path / "p1.yaml")), "--out", str(first)])
    validate.main(["--params", str(write_params(tmp_path / "p2.yaml", prune={"amount": 0.7})), "--out", str(second)])
    assert first.read_bytes() == second.read_bytes()  # a good change does not invalidate every stage
    with pytest.raises(ParamsError):
        validate.main(["--params", str(write_params(tmp_path / "p3.yaml", prune={"amount": 7})), "--out", str(first)])
