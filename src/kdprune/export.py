"""ONNX export with deterministic bytes, its check against PyTorch, and ONNX Runtime sessions to time it.

Exporter: torch's TorchScript exporter (`torch.onnx.export(..., dynamo=False)`), not the torch.export one.
Both wrote the same bytes run after run here, but the TorchScript one exports a small CNN in ~15 ms
(~0.1 s the first time in a process) against 1.3-5 s for dynamo=True, and it needs no extra package
(dynamo=True needs onnxscript). It emits a DeprecationWarning ("will be removed"), silenced below;
when torch drops it, switch to dynamo=True with `dynamic_shapes` and add onnxscript to the
dependencies: tests/test_export.py pins that the bytes stay a pure function of the weights.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kdprune.errors import CheckpointError
from kdprune.files import write_atomic

OPSET = 17  # fixed: the default would follow the installed torch and change the bytes with it
INPUT, OUTPUT = "input", "logits"
CHECK_ROWS = 1024  # rows per ONNX Runtime call in check_onnx: bounds memory on a large test split


def eval_on(model: nn.Module, device: str | torch.device) -> nn.Module:
    """`model` in eval mode on `device`: itself when it already is, else a copy, so the caller's model
    is never moved or switched out of training mode behind its back."""
    device = torch.device(device)
    tensors = [*model.parameters(), *model.buffers()]
    same = all(t.device.type == device.type and (device.index is None or t.device == device) for t in tensors)
    if same and not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).to(device).eval()


def to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float32, C-contiguous array: what the exported graph takes."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX file of `model` as bytes; only the shape of example[:1] matters, the batch axis is dynamic.

    Exported in memory: the bytes depend only on the weights, the architecture and the torch version.
    """
    model = eval_on(model, "cpu")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        torch.onnx.export(model, (example[:1].detach().cpu().float(),), buf, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return buf.getvalue()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> None:
    """Write `model` (exported in eval mode on the CPU) to `path` as ONNX, atomically."""
    write_atomic(path, onnx_bytes(model, example))


def ort_session(path: str | Path, threads: int) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, one inter-op thread, sequential execution, all graph
    optimisations. Idle workers sleep instead of spinning: a session timed after another must not share
    the cores with the first one's spinning threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_run(session: ort.InferenceSession, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits (B, K) of the exported model for a batch x (B, ...)."""
    return session.run([OUTPUT], {INPUT: to_numpy(x)})[0]


@torch.inference_mode()
def _max_abs_diff(session: ort.InferenceSession, model: nn.Module, x: torch.Tensor, path: Path) -> float:
    worst = 0.0
    for chunk in torch.split(x, CHECK_ROWS):
        got, want = ort_run(session, chunk), model(chunk).numpy()  # (b, K) each
        if got.shape != want.shape:
            raise CheckpointError(f"{path}: ONNX Runtime gives shape {got.shape}, PyTorch {want.shape}")
        for side, logits in (("ONNX Runtime", got), ("PyTorch", want)):  # (a NaN difference would not be the max)
            if not np.isfinite(logits).all():
                raise CheckpointError(f"{path}: {side}'s logits are not all finite "
                                      f"({np.size(logits) - np.isfinite(logits).sum()} of {np.size(logits)} are "
                                      "NaN or infinite)")
        worst = max(worst, float(np.abs(got - want).max(initial=0.0)))
    return worst


def check_onnx(path: str | Path, model: nn.Module, x: torch.Tensor, atol: float = 1e-4, threads: int = 1) -> float:
    """Validate the file with the ONNX checker, then compare ONNX Runtime's logits with PyTorch's (on the
    CPU, in eval mode) on every row of x; return the largest absolute difference.

    Raises CheckpointError naming `path` when the file is invalid, either side's logits are not all finite,
    or the difference exceeds `atol`.
    """
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        session = ort_session(path, threads)
    except Exception as e:  # ValidationError, InferenceError, ORT's Fail/InvalidGraph, a missing file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a usable ONNX model ({first})") from e
    diff = _max_abs_diff(session, eval_on(model, "cpu"), x.detach().cpu().float(), path)
    if diff > atol:
        raise CheckpointError(f"{path}: ONNX Runtime and PyTorch logits differ by up to {diff:.3g} "
                              f"(> atol {atol:g}); the file does not match this model")
    return diff
