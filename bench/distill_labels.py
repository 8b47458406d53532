"""Distillation with scarce labels (Hinton et al. 2015): student from scratch vs distilled, per label fraction.

Test accuracy of the student trained from scratch on the labelled fraction alone vs the student
distilled from the teacher's logits on the whole train split (hard labels only on that fraction),
mean ± sample std over seeds, per label fraction.

Per seed: prepare the data with that seed (into a temporary directory), train the teacher on every
label (or adopt teacher.weights), write its logits on the train split there; then per label fraction
(student.label_fraction) train both students from the same seed, as the train_scratch and
train_student stages do: the same calls (fit with params' augmentation and student.l1,
soft_labels.attach, soft_labels.loss). Everything else comes from params.yaml. No MLflow, no DVC,
nothing written into the repo; one torch thread unless --threads. This file also holds what the
other training bench (iterative.py) shares with it. Run from the repo root (digits defaults: about
3 minutes on two CPU cores; one seed and one fraction, about 30 seconds):

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

from kdprune import recipes, soft_labels, teacher
from kdprune.data import Normaliser, Split, augmenter, cycled, labelled, prepare
from kdprune.inference import evaluate, predict
from kdprune.models import build_model
from kdprune.params import FitParams, NetParams, Params, load_params
from kdprune.determinism import setup
from kdprune.errors import CheckpointError, DataError, ParamsError
from kdprune.training import LossFn, fit, resolve_device

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One seed's prepared splits (uint8, on the CPU) and the temporary folder they were written to;
    the teacher's logits go there too, where soft_labels.attach reads them as the stages do."""
    folder: Path
    meta: dict[str, Any]
    norm: Normaliser
    train: Split
    val: Split
    test: Split

    @property
    def soft_labels(self) -> Path:
        return self.folder / "soft_labels"


Rule = tuple[Callable[[Any], bool], str]  # a value's check, and what it expects, as an error says it
SEEDS: Rule = (lambda s: 0 <= s < 2**32, "seeds in [0, 4294967295]")
AT_LEAST_1: Rule = (lambda n: n >= 1, "whole numbers of at least 1")
AT_LEAST_0: Rule = (lambda n: n >= 0, "whole numbers of at least 0")
AMOUNT: Rule = (lambda a: 0 <= a < 1, "a fraction in [0, 1)")  # prune.amount's range


def refuse(ap: argparse.ArgumentParser, args: argparse.Namespace, **rules: Rule) -> None:
    """argparse's one-line error (exit 2), before any work, for an option whose value (or any of whose
    values) its rule refuses: an amount typed as a percentage ran to the end on meaningless numbers, a
    count of 0 failed with a traceback after a teacher had trained."""
    for option, (ok, expected) in rules.items():
        values = getattr(args, option)
        if values is not None and not all(ok(v) for v in (values if isinstance(values, list) else [values])):
            ap.error(f"--{option.replace('_', '-')}: expected {expected}, got {values}")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A missing or refused input (no `dvc repro` yet, a params file with a problem, data not there): its
    message and exit 2, as a stage reports it, not a traceback."""
    try:
        yield
    except (CheckpointError, DataError, ParamsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def common_args(doc: str, seeds: list[int]) -> argparse.ArgumentParser:
    """--params, --raw, --seeds, --threads, --verbose: what both training benches take."""
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
    """Silence fit's per-epoch lines and progress on stderr."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


def load_data(p: Params, raw: Path, tmp: Path) -> Prepared:
    """As the prepare stage: p.data split with p.seed into <tmp>/prepared; then every split, as stages load them."""
    out = tmp / "prepared"
    prepare(p.data.name, raw, out, p.data.val_fraction, p.data.test_fraction, p.seed, p.data.download)
    meta, norm, (train_split, val, test) = recipes.load_data(out, "train", "val", "test")
    return Prepared(tmp, meta, norm, train_split, val, test)


def fit_as_stage(p: Params, model: nn.Module, data: Prepared, train_split: Split, loss: LossFn, cfg: FitParams,
                 desc: str, l1: float = 0.0) -> nn.Module:
    """fit as the stages call it (params' device, seed and augmentation); the model comes back on the CPU."""
    fit(model, train_split, data.val, data.norm, loss, cfg, p.seed, resolve_device(p.device), l1=l1,
        augment=augmenter(p.augment.crop, p.augment.flip), desc=desc)
    return model.cpu()


def build(p: Params, net: NetParams, data: Prepared) -> nn.Module:
    """A fresh model of `net`'s architecture for this data, its weights drawn after seeding with p.seed."""
    setup(p.seed, torch.get_num_threads())
    return build_model(net.spec(data.meta["in_channels"], data.meta["image_size"], data.meta["num_classes"]))


def train_teacher(p: Params, data: Prepared) -> nn.Module:
    """As train_teacher: every hard label, or the user's own weights (teacher.weights)."""
    model = build(p, p.teacher, data)
    if p.teacher.weights:
        teacher.adopt(model, ROOT / p.teacher.weights, data.val, data.norm, resolve_device(p.device))
        return model.cpu()
    return fit_as_stage(p, model, data, data.train, F.cross_entropy, p.teacher, "teacher")


def write_logits(p: Params, data: Prepared, model: nn.Module) -> None:
    """As soft_labels: the teacher's logits on the train split, into the data's soft_labels folder."""
    soft_labels.save(data.soft_labels, predict(model.to(resolve_device(p.device)), data.train, data.norm).cpu())
    model.cpu()


def train_scratch(p: Params, data: Prepared) -> nn.Module:
    """As train_scratch: the student on the labelled fraction alone, in as many steps as the student's."""
    train_split = cycled(labelled(data.train, p.student.label_fraction, p.seed), len(data.train))
    return fit_as_stage(p, build(p, p.student, data), data, train_split, F.cross_entropy, p.student, "scratch",
                        p.student.l1)


def train_distilled(p: Params, data: Prepared) -> nn.Module:
    """As train_student: the KD loss over every train sample, hard labels only on the labelled fraction."""
    train_split = soft_labels.attach(data.train, data.soft_labels, p.student.label_fraction, p.seed)
    return fit_as_stage(p, build(p, p.student, data), data, train_split, soft_labels.loss(p.distill), p.student,
                        "student", p.student.l1)


def with_fraction(p: Params, fraction: float) -> Params:
    return dataclasses.replace(p, student=dataclasses.replace(p.student, label_fraction=fraction))


def accuracy(model: nn.Module, data: Prepared) -> float:
    return evaluate(model, data.test, data.norm)["accuracy"]


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' in percent."""
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def markdown(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def json_line(bench: str, seconds: float, results: list[dict[str, Any]], threads: int | None = None) -> str:
    """The results as one JSON line, floats to 6 digits; `threads`, the thread count every result was computed
    at, where there is one (the timing benches give each row its own)."""
    rows = [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in results]
    return json.dumps({"bench": bench, "seconds": round(seconds, 1),
                       **({"torch_threads": threads} if threads is not None else {}), "results": rows})


def run_bench(name: str, args: argparse.Namespace, per_seed: Callable[[Params], list[dict[str, float]]],
              table: Callable[[list[dict[str, float]]], str]) -> None:
    """Both training benches' main loop: `per_seed` on params.yaml with each of --seeds, on --threads torch
    threads; then the table and the results as one JSON line, with the time it all took."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with one_line_errors():
        base = load_params(args.params)
        results = [r for s in args.seeds for r in per_seed(dataclasses.replace(base, seed=s))]
    print(table(results))
    print(json_line(name, time.perf_counter() - start, results, torch.get_num_threads()))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_seed(p: Params, raw: Path, fractions: list[float], verbose: bool) -> list[dict[str, float]]:
    """One seed: one teacher and its logits, then scratch and distilled students per fraction."""
    with tempfile.TemporaryDirectory(prefix="kdprune-bench-") as tmp, quiet(not verbose):
        data = load_data(p, raw, Path(tmp))
        model = train_teacher(p, data)
        write_logits(p, data, model)
        rows = [{"seed": p.seed, "label_fraction": f, "teacher": accuracy(model, data),
                 "scratch": accuracy(train_scratch(with_fraction(p, f), data), data),
                 "distilled": accuracy(train_distilled(with_fraction(p, f), data), data)} for f in fractions]
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
    refuse(ap, args, seeds=SEEDS, threads=AT_LEAST_1, fractions=(lambda f: 0 < f <= 1, "label fractions in (0, 1]"))
    run_bench("distill_labels", args, lambda p: run_seed(p, args.raw, args.fractions, args.verbose),
              lambda results: table(results, args.fractions))


if __name__ == "__main__":
    main()
