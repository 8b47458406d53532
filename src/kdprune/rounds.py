"""Iterative pruning's rounds: re-scoring the shrunken model, and the short recovery fit between rounds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdprune.data import batches, labelled_subset
from kdprune.importance import SCORERS, Scores
from kdprune.params import Params
from kdprune.training import fit, resolve_device

Split = tuple[torch.Tensor, torch.Tensor]  # (x (N, C, H, W), y (N,))


def rescorer(p: Params, train: Split, first: Scores) -> Callable[[nn.Module], tuple[dict, dict]]:
    """Round 1 uses the score stage's scores; round k re-scores the current model with prune.criterion
    on score.samples train samples shuffled by seed + k."""
    rounds = 0

    def score(model: nn.Module) -> tuple[dict, dict]:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            return first.units, first.weights
        sample = batches(*train, p.score.batch_size, p.score.samples, p.seed + rounds)
        s = SCORERS[p.prune.criterion](model, sample, F.cross_entropy, seed=p.seed, probes=p.score.probes)
        return s.units, s.weights
    return score


def recoverer(p: Params, train: Split, val: Split) -> Callable[[nn.Module], None]:
    """The fit between rounds: hard labels the student may see (student.label_fraction), Adam at
    prune.round_lr for prune.round_epochs."""
    cfg = SimpleNamespace(epochs=p.prune.round_epochs, batch_size=p.finetune.batch_size, optimizer="adam",
                          lr=p.prune.round_lr, weight_decay=0.0)
    x, y = train
    keep = labelled_subset(y, p.student.label_fraction, p.seed)

    def recover(model: nn.Module) -> None:
        fit(model, (x[keep], y[keep]), val, F.cross_entropy, cfg, p.seed, resolve_device(p.device))
        model.cpu()
    return recover
