"""prune.round_to: latency of structured pruning with round_to 1 against round_to 8 at the same amount.

Kernels run faster on channel counts that are multiples of 8 (SIMD lanes, tiles), so a width snapped
to a multiple may win back more time than its MACs say; this measures whether it does here. Two models:
the trained student of the last `dvc repro` (models/student; when it is absent, one built from
params.yaml's student and trained on hard labels for --epochs on a temporary prepared copy of
params.yaml's data: the output says which) and a torchvision architecture (--arch: mobilenet_v2 or
resnet18 as models.py adapts them to small images, at width 0.25, 3x32x32 inputs, 10 classes, RANDOM
weights: latency does not depend on what the weights are). Each is pruned twice from the same weights,
to --amount of its units by L1 magnitude, global scope (kdprune.pruning.prune, structured), once with
round_to 1 and once with round_to 8; both are exported to ONNX (and checked against PyTorch), then
timed interleaved in one run by kdprune.measure.latency_table, in eager PyTorch on the CPU and in ONNX
Runtime, at batch 1 and 256, --threads intra-op threads. Inputs are seeded Gaussian noise of the
model's input shape: dense kernels take the same time whatever the values.

Prints per model the unit widths (before, round_to 1, round_to 8), params and MACs with their ratio
round_to 8 / round_to 1, the median ms of each with its IQR, and the latency ratio round_to 8 /
round_to 1 paired round by round (< 1: round_to 8 is faster; IQR beside it; `noisy` when the IQR
exceeds 15 % of the median); then every figure as one JSON line. Nothing is written into the repo.
Run from the repo root (defaults: about 2 minutes on two busy CPU cores; --rounds 5, about 45 seconds):

    .venv/bin/python bench/rounding.py
    .venv/bin/python bench/rounding.py --amount 0.7 --threads 2 --rounds 50 --arch resnet18
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill_labels import (  # sibling scripts: bench/ is on sys.path when this one runs
    AMOUNT, AT_LEAST_0, AT_LEAST_1, ROOT, json_line, load_data, markdown, one_line_errors, quiet, refuse, train_scratch)
from latency import runs, spread
from kdprune.checkpoints import MODEL_FILE, load_model
from kdprune.export import check_onnx, export_onnx
from kdprune.importance import l1
from kdprune.measure import count_macs, latency_table, speedup
from kdprune.models import build_model, count_params, units
from kdprune.params import Params, load_params
from kdprune.pruning import prune
from kdprune.report import count
from kdprune.determinism import setup

ROUND_TOS = (1, 8)
BATCH_SIZES = [1, 256]
TORCHVISION_WIDTH, TORCHVISION_SHAPE = 0.25, (3, 32, 10)  # width multiplier; channels, image size, classes


def student(args: argparse.Namespace, p: Params) -> tuple[nn.Module, str]:
    """The last dvc repro's trained student, or one trained briefly here; and a line saying which."""
    if (args.student / MODEL_FILE).exists():
        return load_model(args.student)[0], f"trained student of the last dvc repro ({args.student})"
    brief = dataclasses.replace(p, student=dataclasses.replace(p.student, epochs=args.epochs))
    with tempfile.TemporaryDirectory(prefix="kdprune-bench-") as tmp, quiet(True):
        model = train_scratch(brief, load_data(brief, args.raw, Path(tmp)))
    return model, (f"no {args.student / MODEL_FILE}: params.yaml's student built and trained here on hard labels "
                   f"for {args.epochs} epoch(s)")


def torchvision_model(arch: str) -> nn.Module:
    """models.py's adaptation of a torchvision architecture at TORCHVISION_WIDTH, random weights (seed 0)."""
    c, size, k = TORCHVISION_SHAPE
    setup(0, torch.get_num_threads())
    return build_model({"arch": arch, "in_channels": c, "image_size": size, "num_classes": k, "channels": [],
                        "hidden": [], "width": TORCHVISION_WIDTH}).eval()


def pruned(model: nn.Module, amount: float, round_to: int) -> nn.Module:
    """A copy of `model` without `amount` of its units, the lowest by L1 magnitude over all of them
    (global), every pruned width a multiple of round_to (kdprune.pruning.kept_width)."""
    model = copy.deepcopy(model)
    scores = l1(model, [], F.cross_entropy)  # magnitude: needs no data
    prune(model, scores.units, scores.weights, amount, "global", True, round_to=round_to)
    return model.eval()


def widths_table(models: dict[str, nn.Module]) -> tuple[str, dict[str, dict[str, int]]]:
    """One row per unit of the unpruned model: its width in each model (pruning keeps unit names)."""
    widths = {n: {u.name: u.size for u in units(m)} for n, m in models.items()}
    first = next(iter(widths.values()))
    return markdown(["unit", *widths], [[u, *(w[u] for w in widths.values())] for u in first]), widths


def cost_table(models: dict[str, nn.Module], x: torch.Tensor) -> tuple[str, dict[str, Any]]:
    """Params and MACs of each model, and their ratio round_to 8 / round_to 1."""
    cost = {n: {"params": count_params(m), "macs": count_macs(m, x)} for n, m in models.items()}
    r1, r8 = (cost[f"round_to {r}"] for r in ROUND_TOS)
    ratios = {k: r8[k] / r1[k] for k in r1}
    rows = [[n, count(c["params"]), count(c["macs"])] for n, c in cost.items()]
    rows.append(["round_to 8 / round_to 1", f"{ratios['params']:.3f}", f"{ratios['macs']:.3f}"])
    return markdown(["model", "params", "MACs"], rows), {**{f"{k}_ratio": v for k, v in ratios.items()},
                                                         **{f"{n.replace(' ', '_')}_{k}": v for n, c in cost.items()
                                                            for k, v in c.items()}}


def timings(models: dict[str, nn.Module], x: torch.Tensor, args: argparse.Namespace,
            tmp: Path) -> tuple[str, list[dict[str, Any]]]:
    """Both pruned models exported, checked and timed interleaved; per (runtime, batch) their medians and
    the paired latency ratio round_to 8 / round_to 1."""
    paths = {n: tmp / f"{n.replace(' ', '')}.onnx" for n in models}
    for n, m in models.items():
        export_onnx(m, x, paths[n])
        check_onnx(paths[n], m, x[:16], atol=1e-3)  # the file is the model: a wrong export would time nothing
    table = latency_table(models, paths, x, BATCH_SIZES, args.threads, args.rounds, args.warmup, "cpu")
    r1, r8 = (table[f"round_to {r}"] for r in ROUND_TOS)
    rows, results = [], []
    for key, runtime, b in runs(r1):
        ratio = speedup(r8[key], r1[key])  # speedup(base, other) = base / other, per round: here t(r8) / t(r1)
        rows.append([runtime, b, spread(r1[key]), spread(r8[key]), spread(ratio, lambda v: f"{v:.3f}")])
        results.append({"runtime": runtime, "batch": b, "round_to_1_ms": r1[key].median,
                        "round_to_1_iqr_ms": r1[key].iqr, "round_to_8_ms": r8[key].median,
                        "round_to_8_iqr_ms": r8[key].iqr, "ratio_8_over_1": ratio.median,
                        "ratio_iqr": ratio.iqr, "ratio_noisy": ratio.noisy})
    header = ["runtime", "batch", "round_to 1 ms", "round_to 8 ms", "latency round_to 8 / round_to 1 (paired)"]
    return markdown(header, rows), results


def bench(name: str, base: nn.Module, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Prune `base` both ways, print what they are and how fast; return the figures as JSON rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(BATCH_SIZES), *base.input_shape, generator=g)  # (256, C, H, W)
    models = {"unpruned": base, **{f"round_to {r}": pruned(base, args.amount, r) for r in ROUND_TOS}}
    widths, unit_widths = widths_table(models)
    costs, cost_figures = cost_table(models, x)
    del models["unpruned"]  # its widths and costs are context; only the two pruned models are timed
    latency, results = timings(models, x, args, tmp)
    print(f"\n## {name}\n\n{widths}\n\n{costs}\n\n{latency}")
    return [{"model": name, "amount": args.amount, "threads": args.threads, **cost_figures, **r,
             "widths": unit_widths} for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--amount", type=float, default=None, help="fraction of units removed (default: prune.amount)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of both runtimes")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls of each runner first")
    ap.add_argument("--arch", choices=["mobilenet_v2", "resnet18"], default="mobilenet_v2", help="torchvision model")
    ap.add_argument("--student", type=Path, default=ROOT / "models" / "student", help="the trained student's folder")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="prune.amount; the student if absent")
    ap.add_argument("--raw", type=Path, default=ROOT / "data" / "raw", help="raw dataset dir, if a student is trained")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the student trained when there is none")
    args = ap.parse_args()
    refuse(ap, args, amount=AMOUNT, threads=AT_LEAST_1, rounds=AT_LEAST_1, epochs=AT_LEAST_1, warmup=AT_LEAST_0)
    with one_line_errors():
        p = load_params(args.params)
        args.amount = p.prune.amount if args.amount is None else args.amount
        start = time.perf_counter()
        model, source = student(args, p)
    print(f"torch {torch.__version__}; amount {args.amount}, L1 magnitude, global scope; {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; inputs: Gaussian noise")
    print(f"student: {source}")
    with tempfile.TemporaryDirectory(prefix="kdprune-rounding-") as tmp:
        results = bench(f"student ({type(model).__name__})", model, args, Path(tmp))
        results += bench(f"{args.arch} width {TORCHVISION_WIDTH}, random weights", torchvision_model(args.arch), args,
                         Path(tmp))
    print(json_line("rounding", time.perf_counter() - start, results))


if __name__ == "__main__":
    main()
