"""Distillation with scarce labels (Hinton et al. 2015): student from scratch vs distilled, per label fraction.

Test accuracy of the student trained from scratch on the labelled fraction alone vs the student
distilled from the teacher's logits on the whole train split (hard labels only on that fraction),
mean ± sample std over seeds, per label fraction.

Per seed: prepare the data with that seed (into a temporary directory), train the teacher on every
label, take its logits on the train split; then per label fraction train both students from the same
seed, exactly as the train_scratch and train_student stages do. Everything else comes from
params.yaml. No MLflow, no DVC, nothing written into the repo; one torch thread unless --threads.
Run from the repo root (about 2.5 minutes on two CPU cores):

    .venv/bin/python bench/distill_labels.py                      # seeds 0-4, fractions 1.0 and 0.25
    .venv/bin/python bench/distill_labels.py --seeds 0 1 --fractions 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdprune import soft_labels
from kdprune.data import UNLABELLED, labelled_subset, load_meta, load_split, prepare
from kdprune.models import build_model
from kdprune.params import Params, TrainParams, load_params
from kdprune.trainer import model_spec
from kdprune.training import LossFn, evaluate, fit, predict, resolve_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Splits:
    """One seed's prepared data, in memory."""
    train: Pair
    val: Pair
    test: Pair
    meta: dict[str, Any]


def common_args(doc: str, seeds: list[int]) -> argparse.ArgumentParser:
    """--params, --raw, --seeds, --threads, --verbose: what both benches take."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="defaults for everything not varied")
    ap.add_argument("--raw", type=Path, default=ROOT / "data" / "raw", help="raw dataset dir (unused for digits)")
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the last bits of the results depend on it)")
    ap.add_argument("--verbose", action="store_true", help="show the per-epoch training log")
    return ap


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    """Silence fit's per-epoch lines on stderr."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


def load_data(p: Params, raw: Path, tmp: Path) -> Splits:
    """Prepare p.data with p.seed into `tmp` and load every split."""
    prepare(p.data.name, raw, tmp, p.data.val_fraction, p.data.test_fraction, p.seed, p.data.download)
    return Splits(*(load_split(tmp, s) for s in ("train", "val", "test")), load_meta(tmp))


def train(p: Params, cfg: TrainParams, data: Splits, train_set: tuple[torch.Tensor, ...], loss: LossFn,
          l1: float = 0.0) -> nn.Module:
    """A fresh model of cfg's architecture, seeded with p.seed, fitted on train_set (+ an l1 penalty)."""
    seed_everything(p.seed)
    model = build_model(model_spec(cfg, data.meta))
    fit(model, train_set, data.val, loss, cfg, p.seed, resolve_device(p.device), l1=l1)
    return model.cpu()


def train_teacher(p: Params, data: Splits) -> nn.Module:
    """As train_teacher: every hard label."""
    return train(p, p.teacher, data, data.train, F.cross_entropy)


def train_scratch(p: Params, data: Splits, fraction: float) -> nn.Module:
    """As train_scratch: the student on the labelled fraction alone."""
    x, y = data.train
    keep = labelled_subset(y, fraction, p.seed)
    return train(p, p.student, data, (x[keep], y[keep]), F.cross_entropy, p.student.l1)


def kd_train_set(p: Params, data: Splits, logits: torch.Tensor, fraction: float) -> tuple[torch.Tensor, ...]:
    """As soft_labels.load_train, from logits in memory: (x, y UNLABELLED outside the fraction, logits)."""
    x, y = data.train
    return x, torch.where(labelled_subset(y, fraction, p.seed), y, UNLABELLED), logits


def train_distilled(p: Params, data: Splits, logits: torch.Tensor, fraction: float) -> nn.Module:
    """As train_student: the KD loss over every train sample, hard labels only on the fraction."""
    return train(p, p.student, data, kd_train_set(p, data, logits, fraction), soft_labels.loss(p.distill),
                 p.student.l1)


def accuracy(model: nn.Module, data: Splits) -> float:
    return evaluate(model, *data.test)["accuracy"]


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' in percent."""
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def markdown(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def json_line(bench: str, seconds: float, results: list[dict[str, float]]) -> str:
    """The results as one JSON line, floats to 6 digits."""
    rows = [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in results]
    return json.dumps({"bench": bench, "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
                       "results": rows})


def run_bench(name: str, args: argparse.Namespace, per_seed: Callable[[Params], list[dict[str, float]]],
              table: Callable[[list[dict[str, float]]], str]) -> None:
    """Both benches' main loop: `per_seed` on params.yaml with each of --seeds, on --threads torch threads;
    then the table and the results as one JSON line, with the time it all took."""
    torch.set_num_threads(args.threads)
    base = load_params(args.params)
    start = time.perf_counter()
    results = [r for s in args.seeds for r in per_seed(dataclasses.replace(base, seed=s))]
    print(table(results))
    print(json_line(name, time.perf_counter() - start, results))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_seed(p: Params, raw: Path, fractions: list[float], verbose: bool) -> list[dict[str, float]]:
    """One seed: one teacher, then scratch and distilled students per fraction."""
    with tempfile.TemporaryDirectory() as tmp, quiet(not verbose):
        data = load_data(p, raw, Path(tmp))
        teacher = train_teacher(p, data)
        logits = predict(teacher, data.train[0])
        rows = [{"seed": p.seed, "label_fraction": f, "teacher": accuracy(teacher, data),
                 "scratch": accuracy(train_scratch(p, data, f), data),
                 "distilled": accuracy(train_distilled(p, data, logits, f), data)} for f in fractions]
    for r in rows:
        r["distill_gain"] = r["distilled"] - r["scratch"]
        log(f"seed {p.seed} fraction {r['label_fraction']}: scratch {r['scratch']:.4f} "
            f"distilled {r['distilled']:.4f} teacher {r['teacher']:.4f}")
    return rows


def table(results: list[dict[str, float]], fractions: list[float]) -> str:
    cols = ["scratch", "distilled", "distill_gain", "teacher"]
    rows = []
    for f in fractions:
        mine = [r for r in results if r["label_fraction"] == f]
        rows.append([f, *(mean_std([r[c] for r in mine]) for c in cols), len(mine)])
    return markdown(["label_fraction", "scratch acc %", "distilled acc %", "distill_gain (pp)", "teacher acc %",
                     "seeds"], rows)


def main() -> None:
    ap = common_args(__doc__, seeds=[0, 1, 2, 3, 4])
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25], help="label fractions")
    args = ap.parse_args()
    run_bench("distill_labels", args, lambda p: run_seed(p, args.raw, args.fractions, args.verbose),
              lambda results: table(results, args.fractions))


if __name__ == "__main__":
    main()
