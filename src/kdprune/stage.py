"""What every stage script shares: its command line, its error handling, and the train-save-log step."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any, Callable

from kdprune.errors import CheckpointError, DataError, ParamsError, TrackingError
from kdprune.files import read_json, sha256, write_atomic
from kdprune.params import Params, flatten

EXPECTED = (ParamsError, CheckpointError, DataError, TrackingError)


def parser(doc: str, *paths: str) -> argparse.ArgumentParser:
    """--params plus one required --<path> option per input or output the stage touches."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file")
    for name in paths:
        ap.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True, dest=name)
    return ap


def guard(main: Callable[[], Any]) -> None:
    """Run a stage: expected failures print one line per problem and exit 2; Ctrl-C/SIGTERM exit 130."""
    try:
        main()
    except EXPECTED as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        raise SystemExit(130) from None


def section(p: Params, *names: str) -> dict[str, Any]:
    """The flattened params a stage reads: section names ('teacher') or single keys ('seed')."""
    flat = flatten(p)
    return {k: v for k, v in flat.items() if any(k == n or k.startswith(n + ".") for n in names)}


def model_spec(cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The spec to build a model of `cfg` for this data; a resnet's stage widths are expanded here."""
    from kdprune.models import spec_channels

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


def check_provenance(soft_dir: Path, teacher_dir: Path, data_dir: Path) -> None:
    """Refuse soft labels that were not made by this teacher file on this train split."""
    made = read_json(soft_dir / "provenance.json")
    have = {"teacher": sha256(teacher_dir / "model.pt"), "train": read_json(data_dir / "meta.json")["sha256"]["train"]}
    for what, path in (("teacher", teacher_dir / "model.pt"), ("train", data_dir / "train.pt")):
        if made[f"{what}_sha256"] != have[what]:
            raise CheckpointError(f"{soft_dir / 'provenance.json'} was made from another {what} than {path}: "
                                  f"re-run soft_labels, or pass the {what} it was made from")


def save_trained(out: Path, model: Any, spec: dict[str, Any], history: list[dict[str, float]],
                 plots: Path, run: Any, example: Any) -> None:
    """model.pt + spec.json + mlflow_run.json into the staged dir, the curves to plots, the model to MLflow."""
    from kdprune.checkpoints import save_model
    from kdprune.tracking import log_model, write_run_record

    save_model(out, model, spec)
    write_history(plots, history)
    write_run_record(out, run, model_uri=log_model(model, example))


def train_on_labels(name: str, p: Params, cfg: Any, logged: dict[str, Any], args: argparse.Namespace,
                    label_fraction: float = 1.0) -> None:
    """Train a model of `cfg`'s architecture on hard labels (teacher, from-scratch student),
    on the `label_fraction` of the train split whose labels it may see."""
    import torch.nn.functional as F

    from kdprune.data import labelled_subset, load_meta, load_split
    from kdprune.files import staged_dir
    from kdprune.models import build_model
    from kdprune.tracking import log_epoch, stage_run
    from kdprune.training import fit, resolve_device, seed_everything

    spec = model_spec(cfg, load_meta(args.data))
    (x, y), val = load_split(args.data, "train"), load_split(args.data, "val")
    keep = labelled_subset(y, label_fraction, p.seed)
    train = (x[keep], y[keep])
    seed_everything(p.seed)
    model = build_model(spec)
    with stage_run(name, logged, inputs=[args.data]) as run, staged_dir(args.out) as out:
        history = fit(model, train, val, F.cross_entropy, cfg, p.seed, resolve_device(p.device), log_epoch)
        save_trained(out, model.cpu(), spec, history, args.plots, run, val[0])


def with_soft_labels(data_dir: Path, soft_dir: Path, label_fraction: float = 1.0, seed: int = 0) -> tuple:
    """(x, y, teacher logits) of the train split; y is UNLABELLED outside the `label_fraction`
    whose hard labels the student may see (the same stratified subset train_scratch sees)."""
    import torch

    from kdprune.checkpoints import load_tensors
    from kdprune.data import labelled_subset, load_split
    from kdprune.distillation import UNLABELLED

    x, y = load_split(data_dir, "train")
    logits = load_tensors(soft_dir / "logits.pt")["train"]
    if logits.shape[0] != len(y):
        raise CheckpointError(f"{soft_dir / 'logits.pt'} has {logits.shape[0]} rows, {data_dir} has {len(y)}")
    y = torch.where(labelled_subset(y, label_fraction, seed), y, UNLABELLED)
    return x, y, logits


def kd(distill: Any) -> Callable[..., Any]:
    """The training loss over (logits, y, teacher logits) at the params' temperature and alpha."""
    from kdprune.distillation import kd_loss

    return lambda logits, y, teacher: kd_loss(logits, teacher, y, distill.temperature, distill.alpha)


def batches(x: Any, y: Any, batch_size: int, limit: int | None = None, seed: int | None = None) -> list[tuple]:
    """[(x, y), ...] in chunks of batch_size: the first `limit` samples, shuffled by `seed` when given."""
    import torch

    if seed is not None:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        x, y = x[order], y[order]
    n = len(y) if limit is None else min(limit, len(y))
    return [(x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]) for i in range(0, n, batch_size)]
