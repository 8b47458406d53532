"""Latency benchmark: every model of the last `dvc repro`, timed in one run, reported as ratios.

Speed targets belong here, not in tests: ratios measured side by side in one process are
stable where absolute milliseconds are not.  Usage: python bench/latency.py [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdprune.checkpoints import load_model
from kdprune.data import load_split
from kdprune.measure import latencies_ms

MODELS = ("teacher", "student", "pruned", "finetuned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    x, _ = load_split(args.data, "test")
    models = {name: load_model(args.models / name)[0] for name in MODELS}
    rows = []
    for threads in args.threads:
        for b in args.batch_sizes:
            ms = latencies_ms(models, x, b, threads, warmup=10, repeats=args.repeats)
            rows.append({"threads": threads, "batch": b, **{f"{n}_ms": round(v, 3) for n, v in ms.items()},
                         "student/finetuned": round(ms["student"] / ms["finetuned"], 2),
                         "teacher/finetuned": round(ms["teacher"] / ms["finetuned"], 2)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
