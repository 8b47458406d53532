"""Tensor files and model directories (state_dict + spec.json): written atomically, loaded without running code."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdprune.errors import CheckpointError
from kdprune.files import read_json, write_atomic, write_json
from kdprune.models import build_model, spec_of

MODEL_FILE, SPEC_FILE = "model.pt", "spec.json"


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """torch.save into memory, then an atomic write: a reader never sees half a file.

    Saving to a path names the zip's inner folder after the file, so saving to a temporary
    name would make the bytes (and DVC's hash) differ on every run; in memory they depend
    only on the tensors.
    """
    buf = io.BytesIO()
    torch.save(tensors, buf)
    write_atomic(path, buf.getvalue())


def load_tensors(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a file carrying a pickled object is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except Exception as e:  # UnpicklingError for payloads, RuntimeError for truncated zips
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused or corrupt tensor file ({first})") from e


def save_model(out_dir: Path, model: nn.Module, spec: dict[str, Any]) -> None:
    """model.pt (a state_dict) and spec.json (the builder, its arguments and every unit's width) into `out_dir`."""
    save_tensors(out_dir / MODEL_FILE, {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    write_json(out_dir / SPEC_FILE, spec_of(model, spec))


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else f"no tensor but a {type(t).__name__}"


def check_state_dict(model: nn.Module, state: Any, path: str | Path) -> None:
    """Refuse tensors that do not fit `model`, naming the first that is missing, of another shape, not a
    plain dense tensor of the parameter's kind (a sparse or meta tensor failed load_state_dict with a
    traceback), or holding NaN or infinity (a diverged teacher made a pipeline of NaN models, unsaid), in
    the architecture's order; then the first the architecture has no place for."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    expected = model.state_dict()
    for name, want in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: tensor '{name}' is missing, the architecture needs {_shape(want)}")
        got = state[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {_shape(got)}, "
                                  f"the architecture needs {_shape(want)}")
        if got.layout != torch.strided or got.is_meta or got.is_complex() \
                or got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{path}: tensor '{name}' is a {'meta ' if got.is_meta else ''}{got.layout} "
                                  f"{got.dtype} tensor, the architecture needs a dense {want.dtype} one")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{path}: tensor '{name}' holds NaN or infinite values")
    for name in state:
        if name not in expected:
            raise CheckpointError(f"{path}: tensor '{name}' is unexpected, the architecture has no such tensor")


def load_model(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from spec.json and load model.pt into it; refuse anything that does not match.

    Nothing in either file can run code: the spec is plain JSON, checked before anything is built,
    and the tensors are read with weights_only=True (a pickled nn.Module is refused, never unpickled).
    """
    model_dir = Path(model_dir)
    spec_path, weights_path = model_dir / SPEC_FILE, model_dir / MODEL_FILE
    spec = read_json(spec_path)
    try:
        model = build_model(spec)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{spec_path}: {e}") from e
    state = load_tensors(weights_path)
    check_state_dict(model, state, weights_path)
    model.load_state_dict(state)
    return model.eval(), spec
