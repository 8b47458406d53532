"""Iterative vs one-shot pruning at high sparsity (Han et al. 2015): fine-tuned accuracy per step count.

Test accuracy of the distilled student after unstructured pruning to --amount in each of --steps
rounds and fine-tuning, mean ± sample std over seeds, with the weight sparsity measured in the
pruned layers.

Per seed: prepare the data with that seed (into a temporary directory), train the teacher, take its
logits, distil the student on every label (student.label_fraction is set to 1.0). Then per step count,
on a copy of that student, exactly as the prune and finetune stages do: prune.criterion scores on
score.samples train samples in round 1, re-scored in later rounds, with a recovery fit on hard labels
(Adam at prune.round_lr for prune.round_epochs) between rounds, global scope, structured: false; then
fine-tune with params.finetune (KD when finetune.distill) under the fixed masks. Everything else comes
from params.yaml. No MLflow, no DVC, nothing written into the repo; one torch thread unless --threads.
Run from the repo root (about 1.5 minutes on two CPU cores):

    .venv/bin/python bench/iterative.py                           # seeds 0-2, amount 0.9, steps 1 and 4
    .venv/bin/python bench/iterative.py --amount 0.95 --steps 1 2 8 --seeds 0
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill_labels import (  # the sibling script: bench/ is on sys.path when this one runs
    Splits, accuracy, common_args, kd_train_set, load_data, log, markdown, mean_std, quiet, run_bench,
    train_distilled, train_teacher)
from kdprune import soft_labels
from kdprune.data import batches, labelled_subset
from kdprune.importance import SCORERS, Scores
from kdprune.params import Params
from kdprune.pruning import apply_weight_masks, bake_weight_masks, iterative_prune
from kdprune.rounds import recoverer, rescorer
from kdprune.training import fit, predict, resolve_device, seed_everything

Masks = dict[str, torch.Tensor]


def bench_params(base: Params, seed: int, amount: float) -> Params:
    """params.yaml with this seed, every label, and unstructured global pruning to `amount`."""
    return dataclasses.replace(base, seed=seed, student=dataclasses.replace(base.student, label_fraction=1.0),
                               prune=dataclasses.replace(base.prune, amount=amount, structured=False, scope="global"))


def prune_copy(p: Params, data: Splits, student: nn.Module, first: Scores) -> tuple[nn.Module, Masks]:
    """A pruned copy of the student, in p.prune.steps rounds, and its weight masks."""
    model = copy.deepcopy(student)
    masks = iterative_prune(model, rescorer(p, data.train, first), p.prune.amount, p.prune.steps, p.prune.scope,
                            p.prune.structured, data.val[0][:1], recoverer(p, data.train, data.val))
    return model, masks


def finetune(p: Params, data: Splits, model: nn.Module, masks: Masks, logits: torch.Tensor) -> None:
    """As stages/finetune.py: fit under the fixed masks (KD when finetune.distill), then bake them."""
    if p.finetune.distill:
        train, loss = kd_train_set(p, data, logits, p.student.label_fraction), soft_labels.loss(p.distill)
    else:
        x, y = data.train
        keep = labelled_subset(y, p.student.label_fraction, p.seed)
        train, loss = (x[keep], y[keep]), F.cross_entropy
    apply_weight_masks(model, masks)
    seed_everything(p.seed)
    fit(model, train, data.val, loss, p.finetune, p.seed, resolve_device(p.device))
    bake_weight_masks(model)
    model.cpu()


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the prunable layers (every unit's layer; the head is never pruned)."""
    weights = [u.layer.weight for u in model.units()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_steps(p: Params, data: Splits, student: nn.Module, first: Scores, logits: torch.Tensor) -> dict[str, float]:
    """Prune a copy in p.prune.steps rounds, fine-tune it; accuracies before and after fine-tuning."""
    model, masks = prune_copy(p, data, student, first)
    pruned = accuracy(model, data)
    finetune(p, data, model, masks, logits)
    return {"seed": p.seed, "steps": p.prune.steps, "amount": p.prune.amount, "sparsity": sparsity(model),
            "student": accuracy(student, data), "pruned": pruned, "finetuned": accuracy(model, data)}


def run_seed(p: Params, raw: Path, steps: list[int], verbose: bool) -> list[dict[str, float]]:
    """One seed: teacher, logits, distilled student, round-1 scores; then one pruned copy per step count."""
    with tempfile.TemporaryDirectory() as tmp, quiet(not verbose):
        data = load_data(p, raw, Path(tmp))
        logits = predict(train_teacher(p, data), data.train[0])
        student = train_distilled(p, data, logits, p.student.label_fraction)
        # round 1's scores, as the score stage makes them
        sample = batches(*data.train, p.score.batch_size, p.score.samples, p.seed)
        first = SCORERS[p.prune.criterion](student, sample, F.cross_entropy, seed=p.seed, probes=p.score.probes)
        rows = [run_steps(dataclasses.replace(p, prune=dataclasses.replace(p.prune, steps=k)), data, student, first,
                          logits) for k in steps]
    for r in rows:
        log(f"seed {p.seed} steps {r['steps']}: sparsity {r['sparsity']:.4f} pruned {r['pruned']:.4f} "
            f"finetuned {r['finetuned']:.4f} student {r['student']:.4f}")
    return rows


def table(results: list[dict[str, float]], steps: list[int]) -> str:
    rows = []
    for k in steps:
        mine = [r for r in results if r["steps"] == k]
        sp = [r["sparsity"] for r in mine]
        rows.append([k, mine[0]["amount"], f"{min(sp):.4f}–{max(sp):.4f}",
                     *(mean_std([r[c] for r in mine]) for c in ("finetuned", "pruned", "student")), len(mine)])
    return markdown(["steps", "amount", "sparsity (measured)", "finetuned acc %", "pruned acc % (before ft)",
                     "student acc %", "seeds"], rows)


def main() -> None:
    ap = common_args(__doc__, seeds=[0, 1, 2])
    ap.add_argument("--amount", type=float, default=0.9, help="fraction of the prunable weights removed")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4], help="pruning rounds to compare")
    args = ap.parse_args()
    run_bench("iterative", args, lambda p: run_seed(bench_params(p, p.seed, args.amount), args.raw, args.steps,
                                                    args.verbose),
              lambda results: table(results, args.steps))


if __name__ == "__main__":
    main()
