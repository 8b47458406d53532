"""Pruning: scores + amount -> which units or weights go, then a smaller model or a masked one.

Knows nothing of how scores were made (see importance.py); it only ranks them.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune


def normalise(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide each layer's scores by their mean magnitude before a global ranking.

    Raw scores are not on one scale across layers (a wide layer's filters have small norms,
    gradients shrink with depth), so a raw global threshold empties some layers and spares
    others. Mean-normalising (Torch-Pruning's default group normaliser) ranks each unit
    against its own layer's typical unit, so the global cut removes what is weak *where it is*.
    The magnitude, not the signed mean: an OBD saliency can be negative where curvature is.
    """
    return {k: v / v[v.isfinite()].abs().mean().clamp_min(1e-12) for k, v in scores.items()}


def select_units(scores: dict[str, torch.Tensor], amount: float, scope: str) -> dict[str, torch.Tensor]:
    """Indices of the units to remove per layer: the lowest-scored `amount` of all units (global,
    after normalising) or of each layer (layer). Every layer keeps at least one unit."""
    if scope == "layer":
        return {k: v.argsort()[: min(int(amount * len(v)), len(v) - 1)].sort().values for k, v in scores.items()}
    norm = normalise(scores)
    names = [k for k, v in norm.items() for _ in range(len(v))]
    flat = torch.cat(list(norm.values()))
    local = torch.cat([torch.arange(len(v)) for v in norm.values()])
    budget = int(amount * len(flat))
    left = {k: len(v) for k, v in norm.items()}
    chosen: dict[str, list[int]] = {k: [] for k in norm}
    for i in flat.argsort(stable=True).tolist():
        if budget == 0:
            break
        if left[names[i]] > 1:
            chosen[names[i]].append(int(local[i]))
            left[names[i]] -= 1
            budget -= 1
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in chosen.items()}


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
        keep[flat.argsort(stable=True)[: int(amount * len(flat))]] = False
        for n, part in zip(names, keep.split([norm[n].numel() for n in names])):
            masks[n] = part.view_as(norm[n])
    for n, v in norm.items():  # no unit may lose every incoming weight: an emptied one keeps its best
        rows, kept = v.reshape(v.shape[0], -1), masks[n].reshape(v.shape[0], -1)
        best = torch.zeros_like(kept).scatter_(1, rows.argmax(1, keepdim=True), True)
        masks[n] = (kept | (best & ~kept.any(1, keepdim=True))).view_as(v)
    return masks


FRACTIONS = tuple(i / 10 for i in range(10))  # where each layer's sensitivity curve is measured


def sensitivity(model: nn.Module, scores: dict[str, torch.Tensor],
                accuracy: Callable[[nn.Module], float]) -> dict[str, list[float]]:
    """Per layer (a coupled group counts as one), accuracy with its lowest-scored FRACTIONS of units
    masked and every other layer intact: how much each layer can lose on its own."""
    curves = {}
    for u in model.units():
        curve = []
        for f in FRACTIONS:
            trial = copy.deepcopy(model)
            k = min(int(f * u.size), u.size - 1)
            mask_units(trial, {u.name: scores[u.name].argsort()[:k]})
            curve.append(accuracy(trial))
        curves[u.name] = curve
    return curves


def allocate(curves: dict[str, list[float]], sizes: dict[str, int], amount: float) -> dict[str, int]:
    """Units to remove per layer so that `amount` of all units go where the curves say it costs least.

    Greedy, one unit at a time, by the marginal accuracy loss read off each layer's curve
    (linearly interpolated between FRACTIONS); ties go to the larger layer.
    """
    def loss(name: str, k: int) -> float:
        f = k / sizes[name]
        i = min(int(f * 10), len(FRACTIONS) - 2)
        t = (f - FRACTIONS[i]) / (FRACTIONS[i + 1] - FRACTIONS[i])
        return curves[name][0] - ((1 - t) * curves[name][i] + t * curves[name][i + 1])

    counts = dict.fromkeys(sizes, 0)
    for _ in range(int(amount * sum(sizes.values()))):
        open_ = [n for n in sizes if counts[n] < sizes[n] - 1]
        if not open_:
            break
        best = min(open_, key=lambda n: (loss(n, counts[n] + 1) - loss(n, counts[n]), -sizes[n]))
        counts[best] += 1
    return counts


@torch.no_grad()
def mask_units(model: nn.Module, remove: dict[str, torch.Tensor]) -> None:
    """Silence units in place by zeroing their gates: the masked twin of `remove_units`."""
    for u in model.units():
        for p in u.gates:
            p[remove.get(u.name, torch.empty(0, dtype=torch.long))] = 0


def remove_units(model: nn.Module, example: torch.Tensor, remove: dict[str, torch.Tensor]) -> nn.Module:
    """Physically remove units (and every coupled channel: BatchNorm, the next layer's inputs,
    flattened features) with Torch-Pruning's dependency graph. Returns the same, smaller model."""
    import torch_pruning as tp

    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    prune_out = {nn.Conv2d: tp.prune_conv_out_channels, nn.Linear: tp.prune_linear_out_channels}
    for u in model.units():
        idxs = remove.get(u.name)
        if idxs is not None and len(idxs):
            graph.get_pruning_group(u.layer, prune_out[type(u.layer)], idxs=idxs.tolist()).prune()
    return model


def apply_weight_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero weights under fixed masks (torch.nn.utils.prune): they stay zero through fine-tuning."""
    for u in model.units():
        if u.name in masks:
            torch_prune.custom_from_mask(u.layer, "weight", masks[u.name].to(u.layer.weight.device))


def bake_weight_masks(model: nn.Module) -> None:
    """Make masks permanent: plain weights with zeros, so the state_dict is the usual one."""
    for u in model.units():
        if torch_prune.is_pruned(u.layer):
            torch_prune.remove(u.layer, "weight")


class ScoresMismatch(ValueError):
    """Scores made for other layers than the model has."""


def prune(model: nn.Module, unit_scores: dict[str, torch.Tensor], weight_scores: dict[str, torch.Tensor],
          amount: float, scope: str, structured: bool, example: torch.Tensor,
          accuracy: Callable[[nn.Module], float] | None = None) -> dict[str, torch.Tensor] | None:
    """Prune `model` in place; return the weight masks (unstructured) or None (structured).

    scope "sensitivity" (structured only) spreads the amount by each layer's sensitivity curve,
    measured with `accuracy`."""
    expected = {u.name for u in model.units()}
    given = set(unit_scores if structured else weight_scores)
    if given != expected:
        raise ScoresMismatch(f"scores are for layers {sorted(given)}, the model has {sorted(expected)}")
    if structured:
        if scope == "sensitivity":
            counts = allocate(sensitivity(model, unit_scores, accuracy), {u.name: u.size for u in model.units()},
                              amount)
            remove = {n: unit_scores[n].argsort()[:k].sort().values for n, k in counts.items()}
        else:
            remove = select_units(unit_scores, amount, scope)
        remove_units(model, example, remove)
        return None
    masks = select_weights(weight_scores, amount, scope)
    apply_weight_masks(model, masks)
    bake_weight_masks(model)
    return masks


ScoreFn = Callable[[nn.Module], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def iterative_prune(model: nn.Module, score: ScoreFn, amount: float, steps: int, scope: str, structured: bool,
                    example: torch.Tensor, recover: Callable[[nn.Module], None],
                    accuracy: Callable[[nn.Module], float] | None = None) -> dict[str, torch.Tensor] | None:
    """Reach `amount` in `steps` rounds (Han et al. 2015): score the current model, prune it to the
    round's target, recover with a short fine-tune, repeat; no recovery after the last round.

    The targets 1 - (1 - amount)^(k / steps) remove the same share of what is left each round.
    Unstructured masks only grow: a weight pruned in one round stays pruned.
    """
    masks: dict[str, torch.Tensor] | None = None
    done = 0.0
    for k in range(1, steps + 1):
        target = 1 - (1 - amount) ** (k / steps)
        units, weights = score(model)
        if structured:
            prune(model, units, weights, 1 - (1 - target) / (1 - done), scope, True, example, accuracy)
        else:
            if masks is not None:  # already pruned: ranked below everything, so it stays pruned
                weights = {n: w.masked_fill(~masks[n], float("-inf")) for n, w in weights.items()}
            masks = prune(model, units, weights, target, scope, False, example)
        done = target
        if k < steps:
            if masks is not None:
                apply_weight_masks(model, masks)
            recover(model)
            bake_weight_masks(model)
    return masks
