"""Importance criteria: model + data -> a score per unit (neuron, channel) and per weight.

Every scorer has the same signature and returns `Scores`; higher means more important.
Units are models.units (Torch-Pruning's coupled channel groups), scored by unit name; weights are
those of models.prunable_layers (every Conv2d and Linear but the head), scored by layer name.
Unit scores for the loss-based criteria are taken over the unit's *gates* (see models.Unit):
the parameters whose zeroing removes the unit exactly, so each estimates the loss change
of that removal and can be checked against `removal_loss_change`, the truth.
Scorers run on whatever device the model is on (batches already there); scores come back on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator

import torch
from torch import nn

from kdprune.models import Unit, prunable_layers, units

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # [(x (B, C, H, W), y (B,)), ...]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> mean loss


@dataclass(frozen=True)
class Scores:
    units: dict[str, torch.Tensor]  # unit name -> (n_units,)
    weights: dict[str, torch.Tensor]  # layer name -> shape of that layer's weight


Scorer = Callable[..., Scores]  # scorer(model, batches, loss_fn, seed=, probes=) -> Scores


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Sum every entry belonging to output unit j: (n, ...) -> (n,)."""
    return t.reshape(t.shape[0], -1).sum(1)


def _mean_loss(model: nn.Module, batches: Batches, loss_fn: LossFn) -> torch.Tensor:
    return sum(loss_fn(model(x), y) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)


def _cpu(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in scores.items()}


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every prunable layer, by layer name."""
    return {n: m.weight for n, m in prunable_layers(model).items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def l1(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """Magnitude (Li et al. 2017): |w| per weight; per unit the L1 norm of its incoming weights,
    in every layer that makes its channels (a residual stream has several)."""
    return Scores(_cpu({u.name: sum(_rows(m.weight.detach().abs()) for m in u.layers) for u in units(model)}),
                  _cpu({n: w.detach().abs() for n, w in _weights(model).items()}))


def l2(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """Magnitude: w^2 per weight; per unit the L2 norm of its incoming weights."""
    return Scores(_cpu({u.name: sum(_rows(m.weight.detach() ** 2) for m in u.layers).sqrt() for u in units(model)}),
                  _cpu({n: w.detach() ** 2 for n, w in _weights(model).items()}))


def random(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """The control: uniform noise, reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    return Scores({u.name: torch.rand(u.size, generator=g) for u in units(model)},
                  {n: torch.rand(w.shape, generator=g) for n, w in _weights(model).items()})


def taylor(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """First-order Taylor (Molchanov et al. 2017, 2019): |sum_{i in unit} g_i * w_i| per batch, averaged.

    The absolute value is taken per batch, before averaging: summing signed gradients over
    batches first lets contributions of opposite sign cancel and calls important units idle.
    The average weighs each batch by its samples (a short last batch counts for what it holds).
    """
    model.eval()
    found, weights = units(model), _weights(model)
    acc_u = {u.name: torch.zeros(u.size, device=_device(model)) for u in found}
    acc_w = {n: torch.zeros_like(w) for n, w in weights.items()}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for u in found:
                acc_u[u.name] += sum(_rows(p * p.grad) for p in u.gates).abs() * len(y)  # (n,)
            for n, w in weights.items():
                acc_w[n] += (w * w.grad).abs() * len(y)
    model.zero_grad(set_to_none=True)
    n = sum(len(y) for _, y in batches)
    return Scores(_cpu({k: v / n for k, v in acc_u.items()}), _cpu({k: v / n for k, v in acc_w.items()}))


def _coins(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """0/1 draws of `shape` from the CPU generator: every Hutchinson probe's signs."""
    return torch.randint(0, 2, shape, generator=generator)


def hessian_diagonal(model: nn.Module, params: list[torch.Tensor], batches: Batches, loss_fn: LossFn,
                     probes: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Hutchinson's estimate of diag(H) of the mean loss: E_v[v * (H v)], v Rademacher.

    One Hessian-vector product per probe by double backward; the probes are shared by every
    batch so the estimate is of the loss over all of them. `generator` is a CPU generator.
    """
    loss = _mean_loss(model, batches, loss_fn)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    diag = [torch.zeros_like(p) for p in params]
    for _ in range(probes):
        vs = [_coins(p.shape, generator).to(p) * 2 - 1 for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        for d, v, hv in zip(diag, vs, hvs):
            d += v * hv
    return [d.detach() / probes for d in diag]


def unit_quadratic(model: nn.Module, found: list[Unit], batches: Batches, loss_fn: LossFn, probes: int,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Hutchinson over units: E_r[r_j * d_j^T H v], v = sum_k r_k d_k, estimates d_j^T H d_j per unit j.

    d_j is the removal step of unit j (its gate values, zero elsewhere); r is Rademacher per unit,
    so the cross terms between units cancel in expectation while those inside a unit (a BatchNorm
    scale with its shift, a weight row with its bias) are kept: the group OBD saliency, not the
    sum of diagonal terms, which would drop exactly those within-unit couplings.
    """
    gates = [p for u in found for p in u.gates]
    grads = torch.autograd.grad(_mean_loss(model, batches, loss_fn), gates, create_graph=True)
    device = _device(model)
    acc = {u.name: torch.zeros(u.size, device=device) for u in found}
    for _ in range(probes):
        signs = {u.name: _coins((u.size,), generator).to(device).float() * 2 - 1 for u in found}
        vs = [p.detach() * signs[u.name].view(-1, *[1] * (p.dim() - 1)) for u in found for p in u.gates]
        hvs = torch.autograd.grad(grads, gates, grad_outputs=vs, retain_graph=True)
        i = 0
        for u in found:
            dhv = sum(_rows(p.detach() * hv) for p, hv in zip(u.gates, hvs[i:i + len(u.gates)]))  # (n,)
            acc[u.name] += signs[u.name] * dhv
            i += len(u.gates)
    return {k: v / probes for k, v in acc.items()}


def hessian(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 32) -> Scores:
    """Optimal Brain Damage (LeCun et al. 1990): the second-order loss change of a removal.

    Per weight 0.5 * h_ii * w_i^2 with diag(H) by Hutchinson; per unit 0.5 * d^T H d over the
    unit's removal step d (see unit_quadratic). The first-order term is left out, as OBD assumes
    a minimum; compare `taylor` for the first-order estimate. Its two halves (hessian_units,
    hessian_weights) cost about the same and may run apart (kdprune.workers), with the same result.
    """
    return Scores(hessian_units(model, batches, loss_fn, seed, probes),
                  hessian_weights(model, batches, loss_fn, seed, probes))


def hessian_weights(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0,
                    probes: int = 32) -> dict[str, torch.Tensor]:
    """hessian's per-weight scores, from the seed's first `probes` draws of every weight's signs."""
    model.eval()
    weights = _weights(model)
    diag = hessian_diagonal(model, list(weights.values()), batches, loss_fn, probes,
                            torch.Generator().manual_seed(seed))
    return _cpu({n: 0.5 * d * w.detach() ** 2 for (n, w), d in zip(weights.items(), diag)})


def hessian_units(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0,
                  probes: int = 32) -> dict[str, torch.Tensor]:
    """hessian's per-unit scores, from the draws after hessian_weights' (drawn again here and not used,
    so this half needs nothing from the other)."""
    model.eval()
    found = units(model)
    generator = torch.Generator().manual_seed(seed)
    shapes = [w.shape for w in _weights(model).values()]
    for _ in range(probes):
        for shape in shapes:
            _coins(shape, generator)
    quad = unit_quadratic(model, found, batches, loss_fn, probes, generator)
    return _cpu({u.name: 0.5 * quad[u.name] for u in found})


FISHER_BYTES = 1 << 30  # per-sample gradients held at once: a batch is taken in pieces of that size


def fisher(model: nn.Module, batches: Batches, loss_fn: LossFn, seed: int = 0, probes: int = 0) -> Scores:
    """Empirical Fisher (Theis et al. 2018): per-sample squared gradients, averaged over every sample.

    Per weight 0.5 * w_i^2 * mean_n g_{n,i}^2; per unit 0.5 * mean_n (sum_{i in unit} w_i g_{n,i})^2.
    Per-sample gradients come from torch.func (vmap over grad), not from batch gradients: a gradient the
    size of the model for every sample of a batch, so a batch is taken FISHER_BYTES at a time (a ResNet-18
    at full width, 128 samples, had needed 5.7 GB; a small model takes its batches whole, as before).
    """
    from torch.func import functional_call, grad, vmap

    model.eval()
    found, weights = units(model), _weights(model)
    named = dict(model.named_parameters())
    ids = {id(p): n for n, p in named.items()}
    wanted = {ids[id(p)] for u in found for p in u.gates} | {ids[id(w)] for w in weights.values()}
    params = {n: p.detach() for n, p in named.items() if n in wanted}
    frozen = {n: p.detach() for n, p in named.items() if n not in wanted} | dict(model.named_buffers())

    def sample_loss(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**ps, **frozen}, (x[None],)), y[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    acc_u = {u.name: torch.zeros(u.size, device=_device(model)) for u in found}
    acc_w = {n: torch.zeros_like(w) for n, w in weights.items()}
    rows = max(1, FISHER_BYTES // sum(p.numel() * p.element_size() for p in params.values()))
    count = 0
    for x, y in ((xs, ys) for xb, yb in batches for xs, ys in zip(xb.split(rows), yb.split(rows))):
        g = per_sample(params, x, y)  # name -> (B, *param.shape)
        for u in found:
            contrib = sum(_rows_per_sample(g[ids[id(p)]] * p.detach()) for p in u.gates)  # (B, n_units)
            acc_u[u.name] += (contrib ** 2).sum(0)
        for n, w in weights.items():
            acc_w[n] += (g[ids[id(w)]] ** 2).sum(0)
        count += len(y)
    return Scores(_cpu({k: 0.5 * v / count for k, v in acc_u.items()}),
                  _cpu({n: 0.5 * w.detach() ** 2 * acc_w[n] / count for n, w in weights.items()}))


def _rows_per_sample(t: torch.Tensor) -> torch.Tensor:
    """(B, n, ...) -> (B, n): sum every entry of unit j, per sample."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


def _activation_stats(model: nn.Module, batches: Batches) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per unit, over every sample and position: the mean of ReLU(act's output) and its fraction of zeros."""
    model.eval()
    found = units(model)
    sums = {u.name: torch.zeros(u.size, device=_device(model)) for u in found}
    zeros = {u.name: torch.zeros(u.size, device=_device(model)) for u in found}
    counts = dict.fromkeys(sums, 0)

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            flat = out.detach().relu().transpose(0, 1).reshape(out.shape[1], -1)  # (n_units, B * positions)
            sums[name] += flat.sum(1)
            zeros[name] += (flat == 0).sum(1)
            counts[name] += flat.shape[1]
        return record

    handles = [u.act.register_forward_hook(hook(u.name)) for u in found]
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return _cpu({k: v / counts[k] for k, v in sums.items()}), _cpu({k: v / counts[k] for k, v in zeros.items()})


def _broadcast(model: nn.Module, unit_scores: dict[str, torch.Tensor]) -> Scores:
    """Per-weight scores for activation criteria: each weight inherits the score of the unit it feeds
    (a layer whose channels are in no unit, which the graph may leave coupled to the head, gets ones)."""
    owner = {id(m): u.name for u in units(model) for m in u.layers}
    weights = {}
    for n, layer in prunable_layers(model).items():
        w = layer.weight
        s = unit_scores[owner[id(layer)]] if id(layer) in owner else torch.ones(w.shape[0])
        weights[n] = s.view(-1, *[1] * (w.dim() - 1)).expand(w.shape).clone()
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
def removal_loss_change(model: nn.Module, batches: Batches, loss_fn: LossFn,
                        progress: Callable[[], None] | None = None, downstream_only: bool = True,
                        only: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The truth: the loss increase of removing each unit alone (its gates zeroed), unit by unit; of the
    units named in `only`, when given (each unit's numbers are the same either way).

    Zeroing unit j's gates zeroes entry j of the outputs of the modules they belong to and changes nothing
    before them. With `downstream_only` (and a model torch.fx can trace), those outputs are computed once
    per batch and each removal re-runs only what lies downstream of them, from their outputs with entry
    j zeroed: for the default student, 128 of its 160 units re-run just the layers after the last conv.
    A layer of units whose re-run differs from the full forward pass by a single bit (checked on its
    first and last unit) takes the full pass, as does a model that cannot be traced and a layer whose
    kept outputs would outgrow `Downstream.MEMORY` (many samples through a wide early layer).

    The deltas stay on the model's device until the end (no host synchronisation per unit);
    `progress` is called once per unit."""
    model.eval()
    base = _mean_loss(model, batches, loss_fn)
    traced = _trace(model) if downstream_only else None
    out = {}
    for u in units(model):
        if only is not None and u.name not in only:
            continue
        rerun = Downstream.checked(traced, model, u, batches, loss_fn) if traced is not None else None
        deltas = torch.zeros(u.size, device=base.device)
        for j in range(u.size):
            if rerun is not None:
                deltas[j] = rerun.mean_loss(j) - base
            else:
                with _removed(u, j):
                    deltas[j] = _mean_loss(model, batches, loss_fn) - base
            if progress is not None:
                progress()
        out[u.name] = deltas.cpu()
    return out


@contextlib.contextmanager
def _removed(u: Unit, j: int) -> Iterator[None]:
    """Unit j of `u` silenced (its gates zeroed) for the duration; restored bit for bit after."""
    with torch.no_grad():
        saved = [p[j].clone() for p in u.gates]
        for p in u.gates:
            p[j] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(u.gates, saved):
                p[j] = s


def _trace(model: nn.Module) -> Any:
    """The model as a torch.fx graph over the very same modules, or None where it cannot be traced."""
    from torch import fx

    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like: the full pass it is
        return None


class Downstream:
    """The part of a traced model that removing one unit changes, ready to re-run for each of its units.

    `gated` are the calls of the modules holding the unit's gates (a conv's BatchNorm, the BatchNorms of
    a residual stream, a Linear), each with the dimension of its output that indexes the unit. The first
    of them on any path read inputs the removal leaves alone: their outputs come from one forward pass of
    the intact model (`frontier[b]` for batch b, with every other value outside the re-run that it reads),
    entry j zeroed. Everything downstream of them re-runs in graph order (`nodes`), the gated calls among
    them (a stream's later BatchNorms) with entry j of their output zeroed."""

    MEMORY = 1 << 30  # bytes of kept outputs (all batches) above which a layer takes the full pass instead

    def __init__(self, graph_module: Any, gated: dict[Any, int], batches: Batches, loss_fn: LossFn) -> None:
        from torch import fx

        self.gated, self.batches, self.loss_fn = gated, batches, loss_fn
        downstream: set[Any] = set()
        self.first: list[Any] = []
        for node in graph_module.graph.nodes:
            if any(a in downstream for a in node.all_input_nodes):
                downstream.add(node)
            elif node in gated:
                downstream.add(node)
                self.first.append(node)
        self.nodes = [n for n in graph_module.graph.nodes if n in downstream and n not in self.first]
        inside = set(self.nodes)
        needed = {a for n in self.nodes for a in n.all_input_nodes if a not in inside}
        self.interpreter = fx.Interpreter(graph_module, garbage_collect_values=False)
        self.frontier = []
        for x, _ in batches:
            self.interpreter.run(x)
            self.frontier.append({n: self.interpreter.env[n] for n in needed})
        self.interpreter.env = {}
        self.complete = bool(self.nodes) and self.nodes[-1].op == "output"

    @classmethod
    @torch.no_grad()
    def checked(cls, graph_module: Any, model: nn.Module, u: Unit, batches: Batches,
                loss_fn: LossFn) -> Downstream | None:
        """The re-run for unit `u`, if it gives the full forward pass's logits bit for bit; else None."""
        owner = {id(p): name for name, m in model.named_modules() for p in m.parameters(recurse=False)}
        names = {owner.get(id(p)) for p in u.gates}
        modules = dict(model.named_modules())
        if None in names:
            return None
        gated = {n: (-1 if isinstance(modules[n.target], nn.Linear) else 1)
                 for n in graph_module.graph.nodes if n.op == "call_module" and n.target in names}
        if {n.target for n in gated} != names:  # a gate's module is not called as a module of the graph
            return None
        rerun = cls(graph_module, gated, batches[:1], loss_fn)
        kept = sum(v.numel() * v.element_size() for v in rerun.frontier[0].values() if isinstance(v, torch.Tensor))
        if kept * len(batches) > cls.MEMORY:
            return None
        x, _ = batches[0]
        for j in sorted({0, u.size - 1}):
            with _removed(u, j):
                full = model(x)
            if not rerun.complete or not torch.equal(rerun.logits(0, j), full):
                return None
        return cls(graph_module, gated, batches, loss_fn)

    def logits(self, b: int, j: int) -> torch.Tensor:
        env = dict(self.frontier[b])
        for node in self.first:
            env[node] = self._silenced(node, env[node], j)
        self.interpreter.env = env
        try:
            for node in self.nodes:
                value = self.interpreter.run_node(node)
                env[node] = self._silenced(node, value, j) if node in self.gated else value
            return env[self.nodes[-1]]
        finally:
            self.interpreter.env = {}

    def _silenced(self, node: Any, value: torch.Tensor, j: int) -> torch.Tensor:
        value = value.clone()
        value.select(self.gated[node], j).zero_()
        return value

    @torch.no_grad()
    def mean_loss(self, j: int) -> torch.Tensor:
        """_mean_loss of the model with unit j removed, term for term."""
        total = sum(self.loss_fn(self.logits(b, j), y) * len(y) for b, (_, y) in enumerate(self.batches))
        return total / sum(len(y) for _, y in self.batches)


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
