"""Latency benchmark: every model of the last `dvc repro`, timed in one run, reported as paired ratios.

Speed targets belong here, not in tests: ratios measured side by side in one process are stable where
absolute milliseconds are not. Per thread count, kdprune.measure.latency_table times every model in
eager PyTorch and in ONNX Runtime (its models/<name>/model.onnx) at every batch size, in interleaved
rounds on the normalised test split of data/prepared (rows repeated to fill a batch). Prints each
model's params and MACs, then per thread count the median ms of every model with its IQR, and the
speed-ups of the fine-tuned model over the student and over the teacher, paired round by round
(kdprune.measure.speedup: median with its IQR), each beside the ratio of that speed-up to the MACs
reduction (1: every MAC cut became time). A figure whose IQR exceeds 15 % of its median is marked
`noisy`. Ends with every figure as one JSON line. Nothing is written. `make bench` runs it with the
defaults (digits models: about 2 minutes on two busy CPU cores; `--threads 1 --batch-sizes 1 256
--rounds 5` about 10 seconds):

    .venv/bin/python bench/latency.py
    .venv/bin/python bench/latency.py --threads 1 --batch-sizes 1 256 --rounds 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distill_labels import (  # the sibling script: bench/ is on sys.path when this one runs
    AT_LEAST_0, AT_LEAST_1, ROOT, json_line, markdown, one_line_errors, refuse)
from kdprune import recipes
from kdprune.checkpoints import load_model
from kdprune.data import batches
from kdprune.measure import Spread, Timing, count_macs, latency_table, speedup
from kdprune.models import count_params
from kdprune.recipes import ONNX_FILE
from kdprune.report import count, ms, times

MODELS = ("teacher", "student_scratch", "student", "pruned", "finetuned")  # dvc.yaml's models, in pipeline order
TARGET, REFERENCES = "finetuned", ("student", "teacher")  # the speed-ups reported: TARGET over each reference
Table = dict[str, dict[str, Timing]]  # latency_table's: {model: {"torch_b<B>": Timing, "onnx_b<B>": Timing}}


def spread(s: Spread, fmt: Callable[[float], str] = ms) -> str:
    """'median (IQR iqr)', and `noisy` when the rounds spread too wide to trust the median."""
    return f"{fmt(s.median)} (IQR {fmt(s.iqr)})" + (" noisy" if s.noisy else "")


def runs(timings: dict[str, Timing]) -> list[tuple[str, str, int]]:
    """(key, runtime, batch) of latency_table's keys "<runtime>_b<batch>": PyTorch first, then by batch."""
    split = [(key, *key.split("_b")) for key in timings]
    return sorted([(key, runtime, int(b)) for key, runtime, b in split], key=lambda r: (r[1] != "torch", r[2]))


def inputs_of(data: Path) -> torch.Tensor:
    """The test split normalised, (N, C, H, W) float: what the evaluate stage times the models on."""
    _, norm, (test,) = recipes.load_data(data, "test")
    return torch.cat([x for x, *_ in batches(test, 1024, norm)])


def model_table(models: dict[str, nn.Module], macs: dict[str, int]) -> str:
    ref = REFERENCES[0]
    rows = [[n, count(count_params(m)), count(macs[n]), f"{macs[n] / macs[ref]:.3f}"] for n, m in models.items()]
    return markdown(["model", "params", "MACs", f"MACs / {ref}'s"], rows)


def timing_rows(table: Table, macs: dict[str, int], threads: int) -> tuple[list[list[object]], list[dict[str, Any]]]:
    """Per (runtime, batch): a markdown row (every model's median and IQR, the paired speed-ups of TARGET
    over each reference with their ratio to its MACs reduction) and the same figures as a JSON row."""
    rows, results = [], []
    for key, runtime, b in runs(table[TARGET]):
        cells: list[object] = [threads, runtime, b, *(spread(t[key]) for t in table.values())]
        result: dict[str, Any] = {"threads": threads, "runtime": runtime, "batch": b,
                                  **{f"{n}_ms": t[key].median for n, t in table.items()},
                                  **{f"{n}_iqr_ms": t[key].iqr for n, t in table.items()}}
        for ref in REFERENCES:
            s = speedup(table[ref][key], table[TARGET][key])
            per_macs = s.median / (macs[ref] / macs[TARGET])
            cells += [spread(s, times), f"{per_macs:.2f}"]
            result |= {f"speedup_vs_{ref}": s.median, f"speedup_iqr_vs_{ref}": s.iqr,
                       f"speedup_noisy_vs_{ref}": s.noisy, f"speedup_per_macs_vs_{ref}": per_macs}
        rows.append(cells)
        results.append(result)
    return rows, results


def header(names: list[str]) -> list[str]:
    return ["threads", "runtime", "batch", *(f"{n} ms" for n in names),
            *(h for ref in REFERENCES for h in (f"{TARGET} speed-up vs {ref}", "speed-up / MACs cut"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="the models/ folder of the last dvc repro")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts, one run each")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256, 1024])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls of each runner first")
    ap.add_argument("--device", default="cpu",
                    help="where eager PyTorch runs: cpu, cuda or cuda:<index> (ONNX Runtime: always the CPU)")
    args = ap.parse_args()
    refuse(ap, args, threads=AT_LEAST_1, batch_sizes=AT_LEAST_1, rounds=AT_LEAST_1, warmup=AT_LEAST_0)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device}: {str(e).splitlines()[0]}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: expected cpu, cuda or cuda:<index>")
    if device.type == "cuda" and (index := device.index or 0) >= torch.cuda.device_count():
        ap.error(f"--device {args.device}: this machine has no CUDA device {index} "
                 f"({torch.cuda.device_count()} found)")
    start = time.perf_counter()
    with one_line_errors():  # no `dvc repro` yet, or another folder named
        x = inputs_of(args.data)
        models = {n: load_model(args.models / n)[0] for n in MODELS}
    macs = {n: count_macs(m, x) for n, m in models.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available; {args.rounds} rounds, "
          f"eager PyTorch on {args.device}, ONNX Runtime on the CPU\n\n{model_table(models, macs)}\n")
    rows, results = [], []
    for threads in args.threads:
        table = latency_table(models, {n: args.models / n / ONNX_FILE for n in models}, x, args.batch_sizes, threads,
                              args.rounds, args.warmup, args.device)
        more_rows, more_results = timing_rows(table, macs, threads)
        rows += more_rows
        results += more_results
    print(markdown(header(list(models)), rows))
    print(json_line("latency", time.perf_counter() - start, results))


if __name__ == "__main__":
    main()
