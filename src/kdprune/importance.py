"""Importance criteria: model + data -> a score per unit (neuron, channel) and per weight.

Every scorer has the same signature and returns `Scores`; higher means more important.
Unit scores for the loss-based criteria are taken over the unit's *gates* (see models.Unit):
the parameters whose zeroing removes the unit exactly, so each estimates the loss change
of that removal and can be checked against `removal_loss_change`, the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # [(x (B, C, H, W), y (B,)), ...]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> mean loss


@dataclass(frozen=True)
class Scores:
    units: dict[str, torch.Tensor]  # unit name -> (n_units,)
    weights: dict[str, torch.Tensor]  # unit name -> shape of that layer's weight


Scorer = Callable[..., Scores]  # scorer(model, batches, loss_fn, seed=, probes=) -> Scores


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Sum every entry belonging to output unit j: (n, ...) -> (n,)."""
    return t.reshape(t.shape[0], -1).sum(1)


def _mean_loss(model: nn.Module, batches: Batches, loss_fn: LossFn) -> torch.Tensor:
    return sum(loss_fn(model(x), y) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)


def l1(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """Magnitude: |w| per weight, the L1 norm of a unit's incoming weights (Li et al. 2017)."""
    units = model.units()
    return Scores({u.name: _rows(u.layer.weight.detach().abs()) for u in units},
                  {u.name: u.layer.weight.detach().abs() for u in units})


def l2(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """Magnitude: w^2 per weight, the L2 norm of a unit's incoming weights."""
    units = model.units()
    return Scores({u.name: _rows(u.layer.weight.detach() ** 2).sqrt() for u in units},
                  {u.name: u.layer.weight.detach() ** 2 for u in units})


def random(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """The control: uniform noise, reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    units = model.units()
    return Scores({u.name: torch.rand(u.size, generator=g) for u in units},
                  {u.name: torch.rand(u.layer.weight.shape, generator=g) for u in units})


def taylor(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """First-order Taylor (Molchanov et al. 2017, 2019): |sum_{i in unit} g_i * w_i| per batch, averaged.

    The absolute value is taken per batch, before averaging: summing signed gradients over
    batches first lets contributions of opposite sign cancel and calls important units idle.
    """
    model.eval()
    units = model.units()
    acc_u = {u.name: torch.zeros(u.size) for u in units}
    acc_w = {u.name: torch.zeros_like(u.layer.weight) for u in units}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for u in units:
                acc_u[u.name] += sum(_rows(p * p.grad) for p in u.gates).abs()
                acc_w[u.name] += (u.layer.weight * u.layer.weight.grad).abs()
    model.zero_grad(set_to_none=True)
    n = len(batches)
    return Scores({k: v / n for k, v in acc_u.items()}, {k: v.detach() / n for k, v in acc_w.items()})


def hessian_diagonal(model: nn.Module, params: list[torch.Tensor], batches: Batches, loss_fn: LossFn,
                     probes: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Hutchinson's estimate of diag(H) of the mean loss: E_v[v * (H v)], v Rademacher.

    One Hessian-vector product per probe by double backward; the probes are shared by every
    batch so the estimate is of the loss over all of them.
    """
    loss = _mean_loss(model, batches, loss_fn)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    diag = [torch.zeros_like(p) for p in params]
    for _ in range(probes):
        vs = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        for d, v, hv in zip(diag, vs, hvs):
            d += v * hv
    return [d.detach() / probes for d in diag]


def unit_quadratic(model: nn.Module, units: list, batches: Batches, loss_fn: LossFn, probes: int,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Hutchinson over units: E_r[r_j * d_j^T H v], v = sum_k r_k d_k, estimates d_j^T H d_j per unit j.

    d_j is the removal step of unit j (its gate values, zero elsewhere); r is Rademacher per unit,
    so the cross terms between units cancel in expectation while those inside a unit (a BatchNorm
    scale with its shift, a weight row with its bias) are kept: the group OBD saliency, not the
    sum of diagonal terms, which would drop exactly those within-unit couplings.
    """
    gates = [p for u in units for p in u.gates]
    grads = torch.autograd.grad(_mean_loss(model, batches, loss_fn), gates, create_graph=True)
    acc = {u.name: torch.zeros(u.size) for u in units}
    for _ in range(probes):
        signs = {u.name: torch.randint(0, 2, (u.size,), generator=generator).float() * 2 - 1 for u in units}
        vs = [p.detach() * signs[u.name].view(-1, *[1] * (p.dim() - 1)) for u in units for p in u.gates]
        hvs = torch.autograd.grad(grads, gates, grad_outputs=vs, retain_graph=True)
        i = 0
        for u in units:
            dhv = sum(_rows(p.detach() * hv) for p, hv in zip(u.gates, hvs[i:i + len(u.gates)]))  # (n,)
            acc[u.name] += signs[u.name] * dhv
            i += len(u.gates)
    return {k: v / probes for k, v in acc.items()}


def hessian(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 32) -> Scores:
    """Optimal Brain Damage (LeCun et al. 1990): the second-order loss change of a removal.

    Per weight 0.5 * h_ii * w_i^2 with diag(H) by Hutchinson; per unit 0.5 * d^T H d over the
    unit's removal step d (see unit_quadratic). The first-order term is left out, as OBD assumes
    a minimum; compare `taylor` for the first-order estimate.
    """
    model.eval()
    units = model.units()
    generator = torch.Generator().manual_seed(seed)
    weights = [u.layer.weight for u in units]
    diag = hessian_diagonal(model, weights, batches, loss_fn, probes, generator)
    quad = unit_quadratic(model, units, batches, loss_fn, probes, generator)
    return Scores({u.name: 0.5 * quad[u.name] for u in units},
                  {u.name: 0.5 * d * u.layer.weight.detach() ** 2 for u, d in zip(units, diag)})


def fisher(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """Empirical Fisher (Theis et al. 2018): per-sample squared gradients, summed over every sample.

    Per weight 0.5 * w_i^2 * mean_n g_{n,i}^2; per unit 0.5 * mean_n (sum_{i in unit} w_i g_{n,i})^2.
    Per-sample gradients come from torch.func (vmap over grad), not from batch gradients.
    """
    from torch.func import functional_call, grad, vmap

    model.eval()
    units = model.units()
    named = dict(model.named_parameters())
    ids = {id(p): n for n, p in named.items()}
    wanted = {ids[id(p)] for u in units for p in (*u.gates, u.layer.weight)}
    params = {n: p.detach() for n, p in named.items() if n in wanted}
    frozen = {n: p.detach() for n, p in named.items() if n not in wanted} | dict(model.named_buffers())

    def sample_loss(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**ps, **frozen}, (x[None],)), y[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    acc_u = {u.name: torch.zeros(u.size) for u in units}
    acc_w = {u.name: torch.zeros_like(u.layer.weight) for u in units}
    count = 0
    for x, y in batches:
        g = per_sample(params, x, y)  # name -> (B, *param.shape)
        for u in units:
            contrib = sum(_rows_per_sample(g[ids[id(p)]] * p.detach()) for p in u.gates)  # (B, n_units)
            acc_u[u.name] += (contrib ** 2).sum(0)
            acc_w[u.name] += (g[ids[id(u.layer.weight)]] ** 2).sum(0)
        count += len(y)
    return Scores({u.name: 0.5 * acc_u[u.name] / count for u in units},
                  {u.name: 0.5 * u.layer.weight.detach() ** 2 * acc_w[u.name] / count for u in units})


def _rows_per_sample(t: torch.Tensor) -> torch.Tensor:
    """(B, n, ...) -> (B, n): sum every entry of unit j, per sample."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


def _activation_stats(model: nn.Module, batches: Batches) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per unit, over every sample and position: the mean activation and the fraction of zeros."""
    model.eval()
    units = model.units()
    sums = {u.name: torch.zeros(u.size) for u in units}
    zeros = {u.name: torch.zeros(u.size) for u in units}
    counts = dict.fromkeys(sums, 0)

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            flat = out.detach().transpose(0, 1).reshape(out.shape[1], -1)  # (n_units, B * positions)
            sums[name] += flat.sum(1)
            zeros[name] += (flat == 0).sum(1)
            counts[name] += flat.shape[1]
        return record

    handles = [u.act.register_forward_hook(hook(u.name)) for u in units]
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v / counts[k] for k, v in sums.items()}, {k: v / counts[k] for k, v in zeros.items()}


def _broadcast(model: nn.Module, unit_scores: dict[str, torch.Tensor]) -> Scores:
    """Per-weight scores for activation criteria: each weight inherits the score of the unit it feeds."""
    weights = {}
    for u in model.units():
        w = u.layer.weight
        weights[u.name] = unit_scores[u.name].view(-1, *[1] * (w.dim() - 1)).expand_as(w).clone()
    return Scores(unit_scores, weights)


def activation(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """Mean post-ReLU activation of each unit; a unit that rarely fires contributes little."""
    return _broadcast(model, _activation_stats(model, batches)[0])


def apoz(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """1 - APoZ, the average percentage of zeros (Hu et al. 2016): a unit that is mostly zero matters little."""
    return _broadcast(model, {k: 1 - v for k, v in _activation_stats(model, batches)[1].items()})


SCORERS: dict[str, Scorer] = {"l1": l1, "l2": l2, "taylor": taylor, "hessian": hessian, "fisher": fisher,
                              "activation": activation, "apoz": apoz, "random": random}


@torch.no_grad()
def removal_loss_change(model: nn.Module, batches: Batches, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """The truth: the loss increase of removing each unit alone (its gates zeroed), unit by unit."""
    model.eval()
    base = _mean_loss(model, batches, loss_fn)
    out = {}
    for u in model.units():
        deltas = torch.zeros(u.size)
        for j in range(u.size):
            saved = [p[j].clone() for p in u.gates]
            for p in u.gates:
                p[j] = 0
            deltas[j] = _mean_loss(model, batches, loss_fn) - base
            for p, s in zip(u.gates, saved):
                p[j] = s
        out[u.name] = deltas
    return out


def agreement(scores: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """Spearman rank correlation with the truth over all units, and the overlap of the top quarter."""
    from scipy.stats import spearmanr

    s = torch.cat([scores[k] for k in truth]).double()
    t = torch.cat([truth[k] for k in truth]).double()
    k = max(1, len(t) // 4)
    top_s, top_t = set(s.topk(k).indices.tolist()), set(t.topk(k).indices.tolist())
    rho = spearmanr(s.numpy(), t.numpy()).statistic
    return {"spearman": float(rho) if rho == rho else 0.0, "topk_overlap": len(top_s & top_t) / k}


def to_tensors(scores: Scores) -> dict[str, torch.Tensor]:
    """A flat dict of tensors, safe to save and to load with weights_only=True."""
    return {**{f"units/{k}": v for k, v in scores.units.items()},
            **{f"weights/{k}": v for k, v in scores.weights.items()}}


def from_tensors(blob: dict[str, torch.Tensor]) -> Scores:
    pick = lambda kind: {k.split("/", 1)[1]: v for k, v in blob.items() if k.startswith(kind + "/")}  # noqa: E731
    return Scores(pick("units"), pick("weights"))
