"""torchvision's architectures through the whole pipeline on the digits: a mobilenet_v2 or a resnet18
student, distilled from a CNN teacher, scored, pruned smaller, fine-tuned, evaluated, and rebuilt from
their files with the outputs they had."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kdprune.checkpoints import load_model
from kdprune.data import load_meta, load_split, normaliser
from kdprune.models import units
from tests.conftest import run_stage, stage_paths, write_params

pytestmark = pytest.mark.slow
TEACHER = {"channels": [32, 64], "hidden": [128], "epochs": 2}  # 53k parameters: more than either student's
UPSTREAM = ("prepare", "train_teacher", "soft_labels")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The data, the teacher and its soft labels, made once for both students."""
    root = tmp_path_factory.mktemp("arch")
    params = write_params(root / "params.yaml", teacher=TEACHER)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        for name in UPSTREAM:
            run_stage(name, params, **stage_paths(root)[name])
    return {"root": root}


@pytest.mark.parametrize("student", [{"arch": "mobilenet_v2", "width": 0.125}, {"arch": "resnet18", "width": 0.0625}],
                         ids=["mobilenet_v2", "resnet18"])
def test_a_torchvision_student_is_distilled_pruned_smaller_and_rebuilt_exactly(student, upstream, tmp_path,
                                                                               mlflow_store):
    import shutil

    params = write_params(tmp_path / "params.yaml", teacher=TEACHER,
                          student={**student, "channels": [], "hidden": [], "epochs": 1},
                          score={"methods": ["l1", "taylor"], "oracle": False},
                          prune={"round_to": 2}, evaluate={"rounds": 3, "warmup": 0})
    for rel in ("data/prepared", "models/teacher", "artifacts/soft_labels"):
        shutil.copytree(upstream["root"] / rel, tmp_path / rel)
    paths = stage_paths(tmp_path)
    for name, stage_args in paths.items():
        if name not in UPSTREAM:
            run_stage(name, params, **stage_args)
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    for cost in ("params", "macs"):
        assert metrics["pruned"][cost] < 0.9 * metrics["student"][cost], cost
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    test, norm = load_split(tmp_path / "data/prepared", "test"), normaliser(load_meta(tmp_path / "data/prepared"))
    x = norm(test.x[:64])
    full = {u.name: u.size for u in units(load_model(tmp_path / "models/student")[0])}
    for name in ("pruned", "finetuned"):
        model, spec = load_model(tmp_path / "models" / name)
        assert spec["arch"] == student["arch"]
        # prune.round_to 2: a unit pruned keeps an even width; one too small for that is left whole
        assert {n: w for n, w in spec["widths"].items() if w % 2 and w != full[n]} == {}, (spec["widths"], full)
        assert any(w < full[n] for n, w in spec["widths"].items())
        session = ort.InferenceSession(str(tmp_path / "models" / name / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        with torch.no_grad():  # model.onnx came from the model in memory; model.pt + spec.json rebuild it
            np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-5)
