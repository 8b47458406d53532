"""The prune stage's work: the student pruned in one shot or in rounds (re-scored, and recovered by a
short fit between rounds), its per-layer sensitivity curves when asked, and what is kept of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdprune import recipes
from kdprune.recipes import MASKS_FILE
from kdprune.checkpoints import load_tensors, save_tensors
from kdprune.data import Normaliser, Split, labelled, materialise
from kdprune.errors import CheckpointError
from kdprune.importance import SCORERS, Scores, from_tensors
from kdprune.inference import evaluate
from kdprune.models import count_params, units
from kdprune.params import Params
from kdprune.progress import Progress
from kdprune.pruning import FRACTIONS, ScoresMismatch, iterative_prune, sensitivity
from kdprune.training import fit


@dataclass(frozen=True)
class Pruned:
    masks: dict[str, torch.Tensor] | None  # unstructured: the fixed keep-masks per layer
    curves: dict[str, list[float]] | None  # per-layer sensitivity, when measured
    before: dict[str, int]  # units per layer before and after
    after: dict[str, int]
    metrics: dict[str, float]


def prune_student(model: nn.Module, train: Split, val: Split, norm: Normaliser, scores_dir: Path, p: Params) -> Pruned:
    """Prune `model` in place as params.prune says; the first round uses the score stage's scores. Later
    rounds re-score, and recover, on the train rows whose labels the student may see."""
    train = labelled(train, p.student.label_fraction, p.seed)
    scores_file = scores_dir / f"{p.prune.criterion}.pt"
    first = from_tensors(load_tensors(scores_file))
    val = val.to(next(model.parameters()).device)
    accuracy = lambda m: evaluate(m, val, norm)["accuracy"]  # noqa: E731
    before, widths = accuracy(model), {u.name: u.size for u in units(model)}
    curves = None
    if p.prune.scope == "sensitivity" or p.prune.curves:
        with Progress(f"prune: sensitivity curves, {len(widths)} layers x {len(FRACTIONS)} fractions",
                      len(widths) * len(FRACTIONS), unit="evaluation") as progress:
            curves = sensitivity(model, first.units, lambda m: (progress.step(), accuracy(m))[1])
    try:
        masks = iterative_prune(model, rescorer(p, train, norm, first), p.prune.amount, p.prune.steps,
                                p.prune.scope, p.prune.structured, recoverer(p, train, val, norm), accuracy,
                                round_to=p.prune.round_to, curves=curves)  # (measured once, not twice)
    except ScoresMismatch as e:
        raise CheckpointError(f"{scores_file}: {e}") from e
    metrics = {"val_accuracy_before": before, "val_accuracy": accuracy(model), "params": count_params(model)}
    return Pruned(masks, curves, widths, {u.name: u.size for u in units(model)}, metrics)


def rescorer(p: Params, train: Split, norm: Normaliser, first: Scores) -> Callable[[nn.Module], tuple[dict, dict]]:
    """Round 1 uses the score stage's scores; round k re-scores the current model with prune.criterion
    on score.samples train samples shuffled by seed + k."""
    rounds = 0

    def score(model: nn.Module) -> tuple[dict, dict]:
        nonlocal rounds
        rounds += 1
        Progress.say(f"prune: round {rounds}/{p.prune.steps}")
        if rounds == 1:
            return first.units, first.weights
        device = next(model.parameters()).device
        sample = materialise(train.to(device), p.score.batch_size, norm, p.score.samples, p.seed + rounds)
        s = SCORERS[p.prune.criterion](model, sample, F.cross_entropy, seed=p.seed, probes=p.score.probes)
        return s.units, s.weights
    return score


def recoverer(p: Params, train: Split, val: Split, norm: Normaliser) -> Callable[[nn.Module], None]:
    """The fit between rounds (prune.recover: epochs, optimiser, learning rate, weight decay) on `train`,
    the rows whose hard labels the student may see (student.label_fraction)."""

    def recover(model: nn.Module) -> None:
        device = next(model.parameters()).device
        fit(model, train, val, norm, F.cross_entropy, p.prune.recover, p.seed, device, desc="prune: recover")
    return recover


def save(out: Path, model: nn.Module, spec: dict[str, Any], result: Pruned, val: Split, norm: Normaliser,
         run: Any) -> None:
    """The pruned model (model.pt, spec.json with its widths, model.onnx), its masks when unstructured,
    and its sensitivity curves when measured."""
    recipes.keep_model(out, model, spec, "pruned", val, norm, run)
    if result.masks is not None:
        save_tensors(out / MASKS_FILE, {k: v.cpu() for k, v in result.masks.items()})


def plot(result: Pruned, path: Path) -> None:
    from kdprune.report import plot_pruning

    plot_pruning(result.before, result.after, result.curves, FRACTIONS, path)
