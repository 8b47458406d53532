"""What the model-making stages share: the data they fit on, and what they keep of a model (its files,
its ONNX export, its training curve, the MLflow model named after its role)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdprune.checkpoints import save_model
from kdprune.data import Normaliser, Split, batches, load_meta, load_split, normaliser
from kdprune.export import INPUT, OUTPUT, export_onnx
from kdprune.files import write_atomic
from kdprune.inference import predict

ONNX_FILE = "model.onnx"
MASKS_FILE = "masks.pt"  # a pruned model's fixed keep-masks, when unstructured


def load_data(data_dir: Path, *names: str) -> tuple[dict[str, Any], Normaliser, list[Split]]:
    """meta.json, its normaliser, and the named prepared splits (uint8, on the CPU)."""
    meta = load_meta(data_dir)
    return meta, normaliser(meta), [load_split(data_dir, n) for n in names]


def history_csv(history: list[dict[str, float]]) -> str:
    """Per-epoch metrics as CSV, the format `dvc plots` reads; nothing measured, so the same run gives
    the same bytes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["epoch", *history[0]] if history else ["epoch"], lineterminator="\n")
    writer.writeheader()
    for epoch, row in enumerate(history, 1):
        writer.writerow({"epoch": epoch, **{k: f"{v:.6g}" for k, v in row.items()}})
    return buf.getvalue()


def keep_model(out: Path, model: nn.Module, spec: dict[str, Any], role: str, val: Split, norm: Normaliser,
               run: Any) -> None:
    """model.pt + spec.json + model.onnx into the staged directory, and the ONNX model into MLflow
    under its role, with two validation images as its input example."""
    model = model.cpu().eval()
    save_model(out, model, spec)
    example = next(batches(val, 2, norm))[0]  # (2, C, H, W)
    export_onnx(model, example, out / ONNX_FILE)
    with torch.no_grad():
        logits = model(example)
    run.log_model(out / ONNX_FILE, role, example.numpy(), logits.numpy(), (INPUT, OUTPUT))


def keep_curve(path: Path, history: list[dict[str, float]], run: Any) -> None:
    write_atomic(path, history_csv(history))
    run.log_artifact(path)


def accuracy_of(model: nn.Module, split: Split, norm: Normaliser) -> float:
    y = split.y if split.rows is None else split.y[split.rows]
    logits = predict(model, split, norm)
    return (logits.argmax(1).cpu() == y).float().mean().item()
