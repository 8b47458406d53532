"""Pruning: scores + amount -> which units or weights go, then a smaller model or a masked one.

Knows nothing of how scores were made (see importance.py); it only ranks them. What a unit is
(which channels go together) is the models module's, from Torch-Pruning's dependency graph.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from kdprune.models import Unit, prunable_layers, remove_units, units  # remove_units: pruning's API too


def normalise(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide each layer's scores by their mean magnitude before a global ranking.

    Raw scores are not on one scale across layers (a wide layer's filters have small norms,
    gradients shrink with depth), so a raw global threshold empties some layers and spares
    others. Mean-normalising (Torch-Pruning's default group normaliser) ranks each unit
    against its own layer's typical unit, so the global cut removes what is weak *where it is*.
    The magnitude, not the signed mean: an OBD saliency can be negative where curvature is.
    """
    return {k: v / v[v.isfinite()].abs().mean().clamp_min(1e-12) for k, v in scores.items()}


def share(amount: float, n: int) -> int:
    """How many of n `amount` asks for, rounded down; a product that a float's rounding left just under a
    whole number counts as that number (0.7 * 90 is 62.99999999999999: 63)."""
    return math.floor(amount * n + 1e-6)


def kept_width(size: int, want: int, round_to: int = 1, least: int = 1) -> int:
    """The width a unit of `size` keeps when `want` is asked: never below `least`; with round_to > 1,
    the nearest multiple of round_to (ties keep more, never below round_to) or, failing one, the whole
    unit, so a unit smaller than round_to is left whole (Torch-Pruning's round_to, rounded to nearest)."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: an integer >= 1, got {round_to!r}")
    want = min(max(want, least), size)
    if round_to == 1:
        return want
    options = [m for m in range(round_to, size + 1, round_to) if m >= least] + [size]
    return min(options, key=lambda m: (abs(m - want), -m))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores, ties by position, in increasing index order."""
    return scores.argsort(stable=True)[:k].sort().values


def _least(scores: Mapping[str, torch.Tensor], min_sizes: Mapping[str, int] | None) -> dict[str, int]:
    return {k: min(len(v), (min_sizes or {}).get(k, 1)) for k, v in scores.items()}


def select_units(scores: dict[str, torch.Tensor], amount: float, scope: str, *, round_to: int = 1,
                 min_sizes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Indices of the units to remove per layer: the lowest-scored `amount` of all units (global,
    after normalising) or of each layer (layer). Every layer keeps at least min_sizes[name] units
    (default one); with round_to, each layer's kept width is then snapped by `kept_width`."""
    least = _least(scores, min_sizes)
    if scope == "layer":
        counts = {k: min(share(amount, len(v)), len(v) - least[k]) for k, v in scores.items()}
    else:
        counts = _global_counts(normalise(scores), amount, least)
    return {k: _lowest(v, len(v) - kept_width(len(v), len(v) - counts[k], round_to, least[k]))
            for k, v in scores.items()}


def _global_counts(norm: dict[str, torch.Tensor], amount: float, least: dict[str, int]) -> dict[str, int]:
    """How many of each layer's units fall among the lowest `amount` of all, no layer below its least."""
    names = [k for k, v in norm.items() for _ in range(len(v))]
    flat = torch.cat(list(norm.values()))
    budget = share(amount, len(flat))
    counts = dict.fromkeys(norm, 0)
    for i in flat.argsort(stable=True).tolist():
        if budget == 0:
            break
        if len(norm[names[i]]) - counts[names[i]] > least[names[i]]:
            counts[names[i]] += 1
            budget -= 1
    return counts


def select_weights(scores: dict[str, torch.Tensor], amount: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks per layer weight: the lowest-scored `amount` of weights are dropped,
    globally (after normalising) or per layer; every unit keeps at least its best weight."""
    norm = normalise(scores) if scope == "global" else scores
    groups = [list(norm)] if scope == "global" else [[n] for n in norm]
    masks = {}
    for names in groups:
        flat = torch.cat([norm[n].flatten() for n in names])
        keep = torch.ones_like(flat, dtype=torch.bool)
        # exactly the k lowest, ties broken by position: a threshold would drop every tied weight
        keep[flat.argsort(stable=True)[: share(amount, len(flat))]] = False
        for n, part in zip(names, keep.split([norm[n].numel() for n in names])):
            masks[n] = part.view_as(norm[n])
    for n, v in norm.items():  # no unit may lose every incoming weight: an emptied one keeps its best
        rows, kept = v.reshape(v.shape[0], -1), masks[n].reshape(v.shape[0], -1)
        best = torch.zeros_like(kept).scatter_(1, rows.argmax(1, keepdim=True), True)
        masks[n] = (kept | (best & ~kept.any(1, keepdim=True))).view_as(v)
    return masks


FRACTIONS = tuple(i / 10 for i in range(10))  # where each layer's sensitivity curve is measured


@contextlib.contextmanager
def _masked(unit: Unit, idxs: torch.Tensor) -> Iterator[None]:
    """Unit channels `idxs` silenced (gates zeroed) inside the block, restored after it."""
    idxs = idxs.to(unit.gates[0].device)
    saved = [p.detach()[idxs].clone() for p in unit.gates]
    with torch.no_grad():
        for p in unit.gates:
            p[idxs] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(unit.gates, saved):
                p[idxs] = s


def sensitivity(model: nn.Module, scores: dict[str, torch.Tensor],
                accuracy: Callable[[nn.Module], float]) -> dict[str, list[float]]:
    """Per unit, accuracy with its lowest-scored FRACTIONS of channels masked and every other unit
    intact: how much each can lose on its own. Masked in place and restored, so the model is unchanged."""
    curves = {}
    for u in units(model):
        curve = []
        for f in FRACTIONS:
            with _masked(u, _lowest(scores[u.name], max(0, min(share(f, u.size), u.size - u.min_size)))):
                curve.append(accuracy(model))
        curves[u.name] = curve
    return curves


def allocate(curves: dict[str, list[float]], sizes: dict[str, int], amount: float, *, round_to: int = 1,
             min_sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Units to remove per layer so that `amount` of all units go where the curves say it costs least.

    Greedy, one unit at a time, by the marginal accuracy loss read off each layer's curve
    (linearly interpolated between FRACTIONS); ties go to the larger layer. Each layer keeps at
    least min_sizes[name] (default one); with round_to its kept width is then snapped by `kept_width`.
    """
    def loss(name: str, k: int) -> float:
        f = k / sizes[name]
        i = min(int(f * 10), len(FRACTIONS) - 2)
        t = (f - FRACTIONS[i]) / (FRACTIONS[i + 1] - FRACTIONS[i])
        return curves[name][0] - ((1 - t) * curves[name][i] + t * curves[name][i + 1])

    least = {n: min(s, (min_sizes or {}).get(n, 1)) for n, s in sizes.items()}
    counts = dict.fromkeys(sizes, 0)
    for _ in range(share(amount, sum(sizes.values()))):
        open_ = [n for n in sizes if counts[n] < sizes[n] - least[n]]
        if not open_:
            break
        best = min(open_, key=lambda n: (loss(n, counts[n] + 1) - loss(n, counts[n]), -sizes[n]))
        counts[best] += 1
    return {n: s - kept_width(s, s - counts[n], round_to, least[n]) for n, s in sizes.items()}


@torch.no_grad()
def mask_units(model: nn.Module, remove: dict[str, torch.Tensor]) -> None:
    """Silence units in place by zeroing their gates: the masked twin of `remove_units`."""
    for u in units(model):
        idxs = remove.get(u.name, torch.empty(0, dtype=torch.long))
        for p in u.gates:
            p[idxs.to(p.device)] = 0


def apply_weight_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero weights under fixed masks (torch.nn.utils.prune): they stay zero through fine-tuning."""
    for name, layer in prunable_layers(model).items():
        if name in masks:
            torch_prune.custom_from_mask(layer, "weight", masks[name].to(layer.weight.device))


def bake_weight_masks(model: nn.Module) -> None:
    """Make masks permanent: plain weights with zeros, so the state_dict is the usual one."""
    for layer in prunable_layers(model).values():
        if torch_prune.is_pruned(layer):
            torch_prune.remove(layer, "weight")


class ScoresMismatch(ValueError):
    """Scores made for other layers than the model has."""


def _check_scores(model: nn.Module, scores: dict[str, torch.Tensor], structured: bool) -> None:
    shapes = ({u.name: (u.size,) for u in units(model)} if structured
              else {n: tuple(m.weight.shape) for n, m in prunable_layers(model).items()})
    if set(scores) != set(shapes):
        raise ScoresMismatch(f"scores are for layers {sorted(scores)}, the model has {sorted(shapes)}")
    for n, shape in shapes.items():
        if tuple(scores[n].shape) != shape:
            raise ScoresMismatch(f"scores for {n} have shape {tuple(scores[n].shape)}, the model's is {shape}")


def prune(model: nn.Module, unit_scores: dict[str, torch.Tensor], weight_scores: dict[str, torch.Tensor],
          amount: float, scope: str, structured: bool, accuracy: Callable[[nn.Module], float] | None = None,
          *, round_to: int = 1, curves: dict[str, list[float]] | None = None) -> dict[str, torch.Tensor] | None:
    """Prune `model` in place; return the weight masks (unstructured) or None (structured).

    scope "sensitivity" (structured only) spreads the amount by each unit's sensitivity curve, `curves`
    where they were measured already (on this model, with these scores), else measured with `accuracy`.
    With round_to, every pruned unit keeps a multiple of round_to."""
    _check_scores(model, unit_scores if structured else weight_scores, structured)
    if not structured:
        masks = select_weights(weight_scores, amount, scope)
        apply_weight_masks(model, masks)
        bake_weight_masks(model)
        return masks
    found = units(model)
    least = {u.name: u.min_size for u in found}
    if scope == "sensitivity":
        curves = curves if curves is not None else sensitivity(model, unit_scores, accuracy)
        counts = allocate(curves, {u.name: u.size for u in found}, amount, round_to=round_to, min_sizes=least)
        remove = {n: _lowest(unit_scores[n], k) for n, k in counts.items()}
    else:
        remove = select_units(unit_scores, amount, scope, round_to=round_to, min_sizes=least)
    remove_units(model, remove)
    return None


ScoreFn = Callable[[nn.Module], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def iterative_prune(model: nn.Module, score: ScoreFn, amount: float, steps: int, scope: str, structured: bool,
                    recover: Callable[[nn.Module], None], accuracy: Callable[[nn.Module], float] | None = None,
                    *, round_to: int = 1, curves: dict[str, list[float]] | None = None
                    ) -> dict[str, torch.Tensor] | None:
    """Reach `amount` in `steps` rounds (Han et al. 2015): score the current model, prune it to the
    round's target, recover with a short fine-tune, repeat; no recovery after the last round.

    The targets 1 - (1 - amount)^(k / steps) remove the same share of what is left each round.
    Unstructured masks only grow: a weight pruned in one round stays pruned. Structured rounds are sized
    from the units actually left, so a round that round_to or a layer's least kept off target is made up
    by the next. `curves`: round 1's sensitivity curves, where the caller measured them already.
    """
    masks: dict[str, torch.Tensor] | None = None
    start = sum(u.size for u in units(model))
    for k in range(1, steps + 1):
        target = amount if k == steps else 1 - (1 - amount) ** (k / steps)
        unit_scores, weight_scores = score(model)
        if structured:
            left = sum(u.size for u in units(model)) / start
            prune(model, unit_scores, weight_scores, max(0.0, 1 - (1 - target) / left), scope, True, accuracy,
                  round_to=round_to, curves=curves if k == 1 else None)
        else:
            if masks is not None:  # already pruned: ranked below everything, so it stays pruned
                weight_scores = {n: w.masked_fill(~masks[n], float("-inf")) for n, w in weight_scores.items()}
            masks = prune(model, unit_scores, weight_scores, target, scope, False)
        if k < steps:
            if masks is not None:
                apply_weight_masks(model, masks)
            recover(model)
            bake_weight_masks(model)
    return masks
