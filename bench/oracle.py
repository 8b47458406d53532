"""The oracle's shortcut: re-running only what lies downstream of a removed unit, against a full pass.

The true loss change of removing each unit alone, re-running only what lies downstream of the unit
(kdprune.importance.Downstream) against a full forward pass per unit, on the pipeline's own student and
the score stage's oracle samples. Both ways alternate in one process; the medians and their ratio are
printed, and the two must agree bit for bit.

    dvc repro train_student && .venv/bin/python bench/oracle.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=ROOT / "models/student")
    parser.add_argument("--data", type=Path, default=ROOT / "data/prepared")
    args = parser.parse_args()  # before torch's import: `--help` answers at once
    if args.repeats < 1:
        parser.error(f"--repeats: expected a whole number of at least 1, got {args.repeats}")

    import torch
    import torch.nn.functional as F

    from distill_labels import one_line_errors  # the sibling script (it imports torch: after the parse)
    from kdprune import determinism, importance, recipes, scoring
    from kdprune.checkpoints import load_model
    from kdprune.data import labelled
    from kdprune.models import units
    from kdprune.params import load_params

    with one_line_errors():  # no `dvc repro` yet, or another folder named
        p = load_params(ROOT / "params.yaml")
        determinism.setup(p.seed, p.threads)
        model, _ = load_model(args.model)
        _, norm, splits = recipes.load_data(args.data, p.score.oracle_split)
    split = splits[-1]  # the score stage's oracle samples: of the train rows whose labels the students may see
    if p.score.oracle_split == "train":
        split = labelled(split, p.student.label_fraction, p.seed)
    held = scoring.oracle_batches(split, norm, p.score, p.seed)
    n, total = sum(len(y) for _, y in held), sum(u.size for u in units(model))
    print(f"{total} units, {n} {p.score.oracle_split} samples, {p.threads} thread(s)")

    seconds: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for _ in range(args.repeats):
        for downstream_only in (False, True):
            start = time.perf_counter()
            results[downstream_only] = importance.removal_loss_change(model, held, F.cross_entropy,
                                                                      downstream_only=downstream_only)
            seconds[downstream_only].append(time.perf_counter() - start)
    if not all(torch.equal(results[True][k], results[False][k]) for k in results[False]):
        sys.exit("the shortcut's loss changes differ from the full pass's")
    full, fast = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"full forward pass per unit: {full:.2f} s (runs: {', '.join(f'{s:.2f}' for s in seconds[False])})")
    print(f"downstream only:            {fast:.2f} s (runs: {', '.join(f'{s:.2f}' for s in seconds[True])})")
    print(f"speed-up {full / fast:.2f}x, identical results")


if __name__ == "__main__":
    main()
