"""ONNX export: bytes a pure function of the weights, a dynamic batch axis, and a check that catches a stale file."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kdprune.errors import CheckpointError
from kdprune.export import INPUT, OUTPUT, check_onnx, export_onnx, ort_run, ort_session

SHAPE = (1, 8, 8)  # (C, H, W) of one input


def tiny_cnn() -> nn.Sequential:
    """conv-BN-ReLU-pool-linear with fixed weights and non-trivial BN statistics (the exporter folds them)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def tiny_mlp() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def inputs(rows: int) -> torch.Tensor:
    return torch.randn(rows, *SHAPE, generator=torch.Generator().manual_seed(2))


# A second interpreter (its own hash seed) builds the same model from this file and exports it.
CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("t", sys.argv[1])
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
from kdprune.export import export_onnx
export_onnx(t.tiny_cnn(), t.inputs(3), sys.argv[2])
"""


def test_the_same_weights_give_the_same_bytes_in_this_process_and_another(tmp_path):
    export_onnx(tiny_cnn(), inputs(1), tmp_path / "a.onnx")
    export_onnx(tiny_cnn(), inputs(5), tmp_path / "b.onnx")  # the example's batch size must not matter
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", CHILD, __file__, str(tmp_path / "c.onnx")], check=True, env=env,
                   timeout=120)
    a = (tmp_path / "a.onnx").read_bytes()
    assert a == (tmp_path / "b.onnx").read_bytes()
    assert a == (tmp_path / "c.onnx").read_bytes()


def test_other_weights_give_other_bytes(tmp_path):
    model = tiny_cnn()
    export_onnx(model, inputs(1), tmp_path / "a.onnx")
    with torch.no_grad():
        model[-1].bias += 1.0
    export_onnx(model, inputs(1), tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("build", [tiny_cnn, tiny_mlp])
def test_onnx_runtime_matches_pytorch_at_batch_1_and_7(build, tmp_path):
    model, path = build(), tmp_path / "m.onnx"
    export_onnx(model, inputs(1), path)
    session = ort_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == [INPUT]
    assert [o.name for o in session.get_outputs()] == [OUTPUT]
    for rows in (1, 7):
        x = inputs(rows)
        got = ort_run(session, x)
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (rows, 10)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert check_onnx(path, model, inputs(7)) <= 1e-4


def test_the_check_covers_every_row_of_every_chunk(tmp_path, monkeypatch):
    model, path = tiny_mlp(), tmp_path / "m.onnx"
    export_onnx(model, inputs(1), path)
    with torch.no_grad():
        model[1].weight.add_(0.1)
    monkeypatch.setattr("kdprune.export.CHECK_ROWS", 4)  # chunks of 4, 4 and 2 rows
    assert check_onnx(path, model, torch.zeros(10, *SHAPE)) <= 1e-4  # zero rows see the first bias alone
    for row in range(10):  # one row reaching the changed weights, first, inside or last of its chunk
        x = torch.zeros(10, *SHAPE)
        x[row] = 1.0
        with pytest.raises(CheckpointError, match="differ"):
            check_onnx(path, model, x)


def test_a_model_changed_after_export_fails_the_check_naming_the_file(tmp_path):
    model, path = tiny_cnn(), tmp_path / "stale.onnx"
    export_onnx(model, inputs(1), path)
    with torch.no_grad():
        model[0].weight.mul_(1.01)
    with pytest.raises(CheckpointError, match=r"stale\.onnx: .*differ by up to") as caught:
        check_onnx(path, model, inputs(7))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("side", ["model", "file"])
def test_logits_that_are_not_finite_fail_the_check_naming_the_file(tmp_path, side):
    """One NaN in a chunk's differences made its largest difference NaN, which max(worst, nan) dropped: a
    model gone NaN passed as matching its file exactly (and a file gone NaN, its model)."""
    model, path = tiny_mlp(), tmp_path / "m.onnx"
    if side == "file":
        with torch.no_grad():
            model[1].weight[0, 0] = float("nan")
    export_onnx(model, inputs(1), path)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan") if side == "model" else 0.5
    who = "PyTorch" if side == "model" else "ONNX Runtime"
    with pytest.raises(CheckpointError, match=rf"m\.onnx: {who}'s logits are not all finite"):
        check_onnx(path, model, inputs(7))


def test_a_file_that_is_not_onnx_is_named(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match=r"junk\.onnx: not a usable ONNX model"):
        check_onnx(path, tiny_mlp(), inputs(2))


def test_export_leaves_the_callers_model_in_training_mode(tmp_path):
    model = tiny_cnn().train()
    export_onnx(model, inputs(1), tmp_path / "m.onnx")
    assert model.training and model[1].training
    assert check_onnx(tmp_path / "m.onnx", model, inputs(3)) <= 1e-4  # compared in eval mode
    assert model.training


def test_mlflow_gets_a_named_signature_with_a_free_batch_axis():
    from kdprune.runs import model_inputs

    model, x = tiny_cnn(), inputs(2)
    with torch.no_grad():
        kwargs = model_inputs(x.numpy(), model(x).numpy(), (INPUT, OUTPUT))
    sig = kwargs["signature"]
    assert [(s.name, s.shape) for s in sig.inputs.inputs] == [(INPUT, (-1, *SHAPE))]
    assert [(s.name, s.shape) for s in sig.outputs.inputs] == [(OUTPUT, (-1, 10))]
    assert kwargs["input_example"][INPUT].dtype == np.float32
