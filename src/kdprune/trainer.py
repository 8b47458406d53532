"""The training stages' shared recipe: build the model from params, fit, save, log the model."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

from kdprune.checkpoints import save_model
from kdprune.data import labelled_subset, load_meta, load_split
from kdprune.files import staged_dir, write_atomic
from kdprune.models import build_model, spec_channels
from kdprune.params import Params
from kdprune.tracking import log_epoch, log_model, stage_run, write_run_record
from kdprune.training import fit, resolve_device, seed_everything


def model_spec(cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The spec to build a model of `cfg` for this data; a resnet's stage widths are expanded here."""
    return {"arch": cfg.arch, "in_channels": meta["in_channels"], "image_size": meta["image_size"],
            "num_classes": meta["num_classes"], "channels": spec_channels(cfg.arch, list(cfg.channels)),
            "hidden": list(cfg.hidden)}


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch metrics as CSV, the format `dvc plots` reads."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["epoch", *history[0]] if history else ["epoch"])
    writer.writeheader()
    for epoch, row in enumerate(history, 1):
        writer.writerow({"epoch": epoch, **{k: round(v, 6) for k, v in row.items()}})
    write_atomic(path, buf.getvalue())


def save_trained(out: Path, model: Any, spec: dict[str, Any], history: list[dict[str, float]],
                 plots: Path, run: Any, example: Any) -> None:
    """model.pt + spec.json + mlflow_run.json into the staged dir, the curves to plots, the model to MLflow."""
    save_model(out, model, spec)
    write_run_record(out, run, model_uri=log_model(model, example))
    write_history(plots, history)  # last: the export above is the step most likely to fail


def train_on_labels(name: str, p: Params, cfg: Any, logged: dict[str, Any], args: argparse.Namespace,
                    label_fraction: float = 1.0, l1: float = 0.0) -> None:
    """Train a model of `cfg`'s architecture on hard labels (teacher, from-scratch student),
    on the `label_fraction` of the train split whose labels it may see, with an `l1` penalty."""
    import torch.nn.functional as F

    spec = model_spec(cfg, load_meta(args.data))
    (x, y), val = load_split(args.data, "train"), load_split(args.data, "val")
    keep = labelled_subset(y, label_fraction, p.seed)
    train = (x[keep], y[keep])
    seed_everything(p.seed)
    model = build_model(spec)
    with stage_run(name, logged, inputs=[args.data]) as run, staged_dir(args.out) as out:
        history = fit(model, train, val, F.cross_entropy, cfg, p.seed, resolve_device(p.device), log_epoch,
                      l1=l1)
        save_trained(out, model.cpu(), spec, history, args.plots, run, val[0])
