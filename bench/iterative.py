"""Iterative vs one-shot pruning at high sparsity (Han et al. 2015): fine-tuned accuracy per step count.

Test accuracy of the distilled student after unstructured pruning to --amount in each of --steps
rounds and fine-tuning, mean ± sample std over seeds, with the weight sparsity measured in the
pruned layers.

Per seed: prepare the data with that seed (into a temporary directory), train the teacher, write its
logits, distil the student on every label (student.label_fraction is set to 1.0), score it with
prune.criterion as the score stage does (score.samples train samples). Then per step count, on a copy
of that student, as the prune and finetune stages do: kdprune.rounds.prune_student (round 1 uses
those scores, later rounds re-score; a recovery fit with prune.recover on hard labels between rounds;
global scope, structured: false, no sensitivity curves); then fine-tune with params.finetune (KD when
finetune.distill) under the fixed masks. Everything else comes from params.yaml. No MLflow, no DVC,
nothing written into the repo; one torch thread unless --threads. Run from the repo root (digits
defaults: about 2 minutes on two CPU cores; one seed and steps 1 2, about 40 seconds):

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
    AMOUNT, AT_LEAST_1, SEEDS, Prepared, accuracy, common_args, fit_as_stage, labelled, load_data, log, markdown,
    mean_std, quiet, refuse, run_bench, train_distilled, train_teacher, write_logits)
from kdprune import rounds, scoring, soft_labels
from kdprune.models import prunable_layers
from kdprune.params import Params
from kdprune.pruning import apply_weight_masks, bake_weight_masks
from kdprune.determinism import setup
from kdprune.training import resolve_device

Masks = dict[str, torch.Tensor]


def bench_params(base: Params, amount: float) -> Params:
    """params.yaml with every label, and unstructured global pruning to `amount` without curves."""
    return dataclasses.replace(base, student=dataclasses.replace(base.student, label_fraction=1.0),
                               prune=dataclasses.replace(base.prune, amount=amount, structured=False, scope="global",
                                                         curves=False))


def write_scores(p: Params, data: Prepared, student: nn.Module) -> Path:
    """As the score stage, for prune.criterion alone: the scores round 1 of every pruning uses."""
    folder = data.folder / "scores"
    cfg = dataclasses.replace(p.score, methods=[p.prune.criterion])
    scores, _ = scoring.score_all(student.to(resolve_device(p.device)), data.train, data.norm, cfg, p.seed)
    scoring.save(folder, scores, None)
    student.cpu()
    return folder


def prune_copy(p: Params, data: Prepared, student: nn.Module, scores: Path) -> tuple[nn.Module, Masks]:
    """As the prune stage: a pruned copy of the student, in p.prune.steps rounds, and its weight masks. Seeded
    as the stage is (its recovery fits draw dropout from it), whichever step counts ran before."""
    setup(p.seed, torch.get_num_threads())
    model = copy.deepcopy(student).to(resolve_device(p.device))
    result = rounds.prune_student(model, data.train, data.val, data.norm, scores, p)
    return model.cpu(), result.masks


def finetune(p: Params, data: Prepared, model: nn.Module, masks: Masks) -> None:
    """As the finetune stage: fit under the fixed masks (KD when finetune.distill), then bake them."""
    if p.finetune.distill:
        train_split = soft_labels.attach(data.train, data.soft_labels, p.student.label_fraction, p.seed)
        loss = soft_labels.loss(p.distill)
    else:
        train_split, loss = labelled(data.train, p.student.label_fraction, p.seed), F.cross_entropy
    apply_weight_masks(model, masks)
    setup(p.seed, torch.get_num_threads())
    fit_as_stage(p, model, data, train_split, loss, p.finetune, "finetune")
    bake_weight_masks(model)


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the prunable layers (every Conv2d and Linear but the head): what the
    masks cover."""
    weights = [m.weight for m in prunable_layers(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_steps(p: Params, data: Prepared, student: nn.Module, scores: Path) -> dict[str, float]:
    """Prune a copy in p.prune.steps rounds, fine-tune it; accuracies before and after fine-tuning."""
    model, masks = prune_copy(p, data, student, scores)
    pruned = accuracy(model, data)
    finetune(p, data, model, masks)
    return {"seed": p.seed, "steps": p.prune.steps, "amount": p.prune.amount, "sparsity": sparsity(model),
            "student": accuracy(student, data), "pruned": pruned, "finetuned": accuracy(model, data)}


def run_seed(p: Params, raw: Path, steps: list[int], verbose: bool) -> list[dict[str, float]]:
    """One seed: teacher, logits, distilled student, round-1 scores; then one pruned copy per step count."""
    with tempfile.TemporaryDirectory(prefix="kdprune-bench-") as tmp, quiet(not verbose):
        data = load_data(p, raw, Path(tmp))
        write_logits(p, data, train_teacher(p, data))
        student = train_distilled(p, data)
        scores = write_scores(p, data, student)
        rows = [run_steps(dataclasses.replace(p, prune=dataclasses.replace(p.prune, steps=k)), data, student, scores)
                for k in steps]
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
    refuse(ap, args, seeds=SEEDS, threads=AT_LEAST_1, amount=AMOUNT,
           steps=(lambda k: 1 <= k <= 100, "round counts in [1, 100]"))  # prune.steps' range
    run_bench("iterative", args, lambda p: run_seed(bench_params(p, args.amount), args.raw, args.steps, args.verbose),
              lambda results: table(results, args.steps))


if __name__ == "__main__":
    main()
