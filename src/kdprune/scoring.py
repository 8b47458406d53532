"""The score stage's work: every criterion on the student, the oracle, and how well they agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdprune import importance
from kdprune.checkpoints import save_tensors
from kdprune.data import Normaliser, Split, materialise
from kdprune.files import write_json
from kdprune.models import units
from kdprune.progress import Progress

ORACLE_FILE = "oracle.pt"


def score_all(model: nn.Module, train: Split, norm: Normaliser, cfg: Any, seed: int) -> dict[str, importance.Scores]:
    """Every criterion of `cfg.methods` on `cfg.samples` train samples (one seeded shuffle, shared by all)."""
    device = next(model.parameters()).device
    sample = materialise(train.to(device), cfg.batch_size, norm, cfg.samples, seed)
    scores = {}
    with Progress("score", len(cfg.methods), unit="criterion") as progress:
        for i, method in enumerate(cfg.methods, 1):
            Progress.say(f"score: {method} ({i}/{len(cfg.methods)}) on {sum(len(y) for _, y in sample)} samples")
            scores[method] = importance.SCORERS[method](model, sample, F.cross_entropy, seed=seed, probes=cfg.probes)
            progress.step()
    return scores


def oracle_batches(split: Split, norm: Normaliser, cfg: Any, seed: int,
                   device: torch.device | str = "cpu") -> importance.Batches:
    """The oracle's `cfg.oracle_samples` samples of the split (a shuffle of their own), in batches."""
    return materialise(split.to(device), cfg.batch_size, norm, cfg.oracle_samples, seed + 1)


def oracle(model: nn.Module, split: Split, norm: Normaliser, cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    """The true loss increase of removing each unit alone, on `cfg.oracle_samples` samples of the split."""
    held = oracle_batches(split, norm, cfg, seed, next(model.parameters()).device)
    n = sum(len(y) for _, y in held)
    total = sum(u.size for u in units(model))
    with Progress(f"score: oracle, removing each of {total} units alone, on {n} {cfg.oracle_split} samples",
                  total, unit="unit") as progress:
        return importance.removal_loss_change(model, held, F.cross_entropy, progress=progress.step)


def save(out: Path, scores: dict[str, importance.Scores], truth: dict[str, torch.Tensor] | None) -> None:
    for method, s in scores.items():
        save_tensors(out / f"{method}.pt", importance.to_tensors(s))
    if truth is not None:
        save_tensors(out / ORACLE_FILE, {k: v.cpu() for k, v in truth.items()})


def report(scores: dict[str, importance.Scores], truth: dict[str, torch.Tensor] | None, agreement: Path,
           plot: Path) -> dict[str, float]:
    """plots/score.json (one row per criterion: Spearman and top-quarter overlap with the oracle; empty
    without an oracle) and plots/score.png (ranks against the oracle's, or, without one, how the
    criteria agree with each other). Returns {criterion: Spearman}."""
    from kdprune import report as figures

    units = {m: s.units for m, s in scores.items()}
    rows = []
    if truth is not None:
        rows = [{"criterion": m, **importance.agreement(u, truth)} for m, u in units.items()]
        figures.plot_oracle(units, truth, plot)
    else:
        figures.plot_criteria(units, plot)
    write_json(agreement, rows)
    return {r["criterion"]: r["spearman"] for r in rows}
