"""The score stage's work: every criterion on the student, the oracle, and how well they agree."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdprune import importance, workers
from kdprune.checkpoints import save_tensors
from kdprune.data import Normaliser, Split, materialise
from kdprune.files import write_json
from kdprune.models import units
from kdprune.progress import Progress

ORACLE_FILE = "oracle.pt"


def score_all(model: nn.Module, train: Split, norm: Normaliser, cfg: Any, seed: int, held: Split | None = None,
              processes: int = 1) -> tuple[dict[str, importance.Scores], dict[str, torch.Tensor] | None]:
    """Every criterion of `cfg.methods` on `cfg.samples` train samples (one seeded shuffle, shared by all)
    and, given the `held` split, the oracle on it (else None). The work is cut into independent pieces
    for up to `processes` processes (kdprune.workers): the same bytes on any number."""
    device = next(model.parameters()).device
    sample = materialise(train.to(device), cfg.batch_size, norm, cfg.samples, seed)
    loss, found = F.cross_entropy, [u.name for u in units(model)]
    pieces = []  # the longest first: the Hessian's halves, the oracle's layers, then the rest
    if "hessian" in cfg.methods:
        pieces += [("hessian:weights", partial(importance.hessian_weights, model, sample, loss, seed, cfg.probes)),
                   ("hessian:units", partial(importance.hessian_units, model, sample, loss, seed, cfg.probes))]
    # the oracle layer by layer only where the layers can run apart: each piece samples, traces and
    # takes the intact loss again
    layers = [[name] for name in found] if processes > 1 else [None]
    oracles = [] if held is None else [f"oracle:{only[0]}" if only else "oracle" for only in layers]
    pieces += [(name, partial(oracle, model, held, norm, cfg, seed, only=only)) for name, only in zip(oracles, layers)]
    pieces += [(m, partial(_criterion, m, model, sample, cfg, seed)) for m in cfg.methods if m != "hessian"]
    n = sum(len(y) for _, y in sample)
    Progress.say(f"score: {', '.join(cfg.methods)} on {n} samples{', and the oracle' * (held is not None)}: "
                 f"{len(pieces)} pieces of work for {min(processes, len(pieces))} process(es)")
    finished = []

    def done(name: str) -> None:
        finished.append(name)
        Progress.say(f"score: {name} done ({len(finished)}/{len(pieces)})")

    results = workers.run(pieces, processes, on_done=done)
    if "hessian" in cfg.methods:
        results["hessian"] = importance.to_tensors(importance.Scores(results["hessian:units"],
                                                                     results["hessian:weights"]))
    scores = {m: importance.from_tensors(results[m]) for m in cfg.methods}
    parts = {unit: deltas for name in oracles for unit, deltas in results[name].items()}
    truth = {name: parts[name] for name in found} if oracles else None
    return scores, truth


def _criterion(method: str, model: nn.Module, sample: importance.Batches, cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    return importance.to_tensors(importance.SCORERS[method](model, sample, F.cross_entropy, seed=seed,
                                                            probes=cfg.probes))


def oracle_batches(split: Split, norm: Normaliser, cfg: Any, seed: int,
                   device: torch.device | str = "cpu") -> importance.Batches:
    """The oracle's `cfg.oracle_samples` samples of the split (a shuffle of their own), in batches."""
    return materialise(split.to(device), cfg.batch_size, norm, cfg.oracle_samples, seed + 1)


def oracle(model: nn.Module, split: Split, norm: Normaliser, cfg: Any, seed: int,
           only: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The true loss increase of removing each unit alone (of the units named in `only`, when given), on
    `cfg.oracle_samples` samples of the split."""
    held = oracle_batches(split, norm, cfg, seed, next(model.parameters()).device)
    n = sum(len(y) for _, y in held)
    total = sum(u.size for u in units(model) if only is None or u.name in only)
    with Progress(f"score: oracle, removing each of {total} units alone, on {n} {cfg.oracle_split} samples",
                  total, unit="unit") as progress:
        return importance.removal_loss_change(model, held, F.cross_entropy, progress=progress.step, only=only)


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
