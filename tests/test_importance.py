"""Importance criteria against known values: exact Hessians, true loss changes, hand-made activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdprune import importance
from kdprune.models import build_model, prunable_layers, units
from tests.test_models import ARCHS, SPECS, tiny

MLP = {"arch": "mlp", "in_channels": 1, "image_size": 2, "num_classes": 3, "channels": [], "hidden": [5, 4]}
CNN = {"arch": "cnn", "in_channels": 1, "image_size": 8, "num_classes": 4, "channels": [3, 4], "hidden": [5]}


def _tiny(spec: dict = MLP, seed: int = 0, n: int = 48) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so BN gates matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g)
    y = torch.randint(0, spec["num_classes"], (n,), generator=g)
    return model, [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])]


def _exact_hessian(model: torch.nn.Module, params: list[torch.Tensor], batches: list) -> torch.Tensor:
    """The full Hessian of the mean loss over all batches w.r.t. `params`, by torch.autograd.functional."""
    names = {id(p): n for n, p in model.named_parameters()}
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    sizes = [p.numel() for p in params]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = flat.split(sizes)
        override = {names[id(p)]: piece.view_as(p) for p, piece in zip(params, pieces)}
        return F.cross_entropy(functional_call(model, override, (x,)), y)

    return torch.autograd.functional.hessian(loss, torch.cat([p.detach().flatten() for p in params]))


@pytest.mark.slow  # thousands of Hutchinson probes against an exact Hessian: 15-40 s
def test_hutchinson_diagonal_matches_the_exact_hessian_over_all_batches():
    model, batches = _tiny()
    params = [p for p in model.parameters()]
    exact = _exact_hessian(model, params, batches)
    probes = 3000
    est = torch.cat([d.flatten() for d in importance.hessian_diagonal(
        model, params, batches, F.cross_entropy, probes, torch.Generator().manual_seed(0))])
    # Hutchinson's per-entry variance is sum_{j != i} H_ij^2: allow five standard errors
    off = exact - torch.diag(exact.diagonal())
    stderr = (off.pow(2).sum(1) / probes).sqrt()
    assert torch.all((est - exact.diagonal()).abs() <= 5 * stderr + 1e-6)
    assert torch.corrcoef(torch.stack([est, exact.diagonal()]))[0, 1] > 0.99
    # ...and it is the Hessian of *all* the batches, not just the last one
    last_only = _exact_hessian(model, params, batches[1:]).diagonal()
    assert (est - exact.diagonal()).abs().sum() < (est - last_only).abs().sum()


@pytest.mark.slow  # thousands of Hutchinson probes against an exact Hessian: 15-40 s
def test_hessian_scores_are_obd_saliencies():
    from scipy.stats import spearmanr

    model, batches = _tiny()
    scores = importance.hessian(model, batches, F.cross_entropy, seed=0, probes=3000)
    for u in units(model):
        params = [u.layer.weight, u.layer.bias]
        full = _exact_hessian(model, params, batches)
        diag = full.diagonal()
        h_w = diag[: u.layer.weight.numel()].view_as(u.layer.weight)
        expected_w = 0.5 * h_w * u.layer.weight.detach() ** 2
        expected_u = torch.zeros(u.size)
        for j in range(u.size):  # 0.5 d^T H d, d = the removal step of unit j (its row and its bias)
            d = torch.cat([torch.zeros_like(u.layer.weight).index_copy(0, torch.tensor([j]),
                                                                       u.layer.weight.detach()[j:j + 1]).flatten(),
                           torch.zeros_like(u.layer.bias).index_copy(0, torch.tensor([j]),
                                                                     u.layer.bias.detach()[j:j + 1])])
            expected_u[j] = 0.5 * d @ full @ d
        got_w = scores.weights[u.name]
        assert (got_w - expected_w).abs().sum() < 0.15 * expected_w.abs().sum()  # Hutchinson noise only
        assert torch.corrcoef(torch.stack([got_w.flatten(), expected_w.flatten()]))[0, 1] > 0.95
        assert spearmanr(scores.units[u.name], expected_u).statistic >= 0.8  # 5 units: one near-tie may swap
        assert (scores.units[u.name] - expected_u).abs().sum() < 0.15 * expected_u.abs().sum()


def test_taylor_ranks_units_like_the_true_loss_change_of_removing_them():
    from scipy.stats import spearmanr

    model, batches = _tiny(CNN, n=64)
    truth = importance.removal_loss_change(model, batches, F.cross_entropy)
    taylor = importance.taylor(model, batches[:1] + batches[1:], F.cross_entropy)
    s = torch.cat([taylor.units[k] for k in truth])
    t = torch.cat([truth[k] for k in truth]).abs()
    assert spearmanr(s, t).statistic > 0.7
    rnd = importance.random(model, batches, F.cross_entropy, seed=0)
    assert spearmanr(s, t).statistic > spearmanr(torch.cat([rnd.units[k] for k in truth]), t).statistic + 0.3


def test_removal_loss_change_is_the_loss_with_the_unit_silenced():
    model, batches = _tiny(CNN)
    truth = importance.removal_loss_change(model, batches, F.cross_entropy)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    base = F.cross_entropy(model(x), y)
    bn = model.features[1][1]
    with torch.no_grad():
        bn.weight[2], bn.bias[2] = 0.0, 0.0
        assert truth["features.1.0"][2].item() == pytest.approx((F.cross_entropy(model(x), y) - base).item(), abs=1e-6)


# resnet18's and mobilenet_v2's take 4-5 s each (every unit of a deep model, removed one by one): `make test`
# runs them, `make test-fast` the others (the own resnet has residual streams too)
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in ("resnet18", "mobilenet_v2") else a
                                  for a in ARCHS])
def test_a_removal_reruns_only_what_lies_downstream_and_matches_the_full_pass_bit_for_bit(arch):
    """The oracle's shortcut is taken for every unit of every architecture, gives the full forward pass's
    mean loss exactly, and for the last units re-runs a small part of the graph."""
    model, spec = tiny(arch), SPECS[arch]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g)
    y = torch.randint(0, spec["num_classes"], (8,), generator=g)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    graph = importance._trace(model)
    nodes = len(graph.graph.nodes)
    for u in units(model):
        rerun = importance.Downstream.checked(graph, model, u, batches, F.cross_entropy)
        assert rerun is not None, u.name
        for j in sorted({0, u.size // 2, u.size - 1}):
            with importance._removed(u, j), torch.no_grad():
                full = importance._mean_loss(model, batches, F.cross_entropy)
            assert torch.equal(rerun.mean_loss(j), full), (u.name, j)
    assert len(rerun.nodes) < nodes / 2, (len(rerun.nodes), nodes)


def test_a_shortcut_that_differs_from_the_full_pass_by_a_bit_is_not_taken(monkeypatch):
    model, batches = _tiny(CNN)
    full = importance.removal_loss_change(model, batches, F.cross_entropy, downstream_only=False)
    monkeypatch.setattr(importance.Downstream, "_silenced", lambda self, node, value, j: value)  # removes nothing
    graph = importance._trace(model)
    assert all(importance.Downstream.checked(graph, model, u, batches, F.cross_entropy) is None for u in units(model))
    fast = importance.removal_loss_change(model, batches, F.cross_entropy)
    assert all(torch.equal(fast[k], full[k]) for k in full)


def test_a_layer_whose_kept_outputs_would_outgrow_the_memory_bound_takes_the_full_pass(monkeypatch):
    model, batches = _tiny(CNN)
    graph = importance._trace(model)
    assert all(importance.Downstream.checked(graph, model, u, batches, F.cross_entropy) for u in units(model))
    monkeypatch.setattr(importance.Downstream, "MEMORY", 100)  # bytes: less than any layer keeps
    assert all(importance.Downstream.checked(graph, model, u, batches, F.cross_entropy) is None for u in units(model))


def test_the_oracle_with_and_without_its_shortcut_writes_the_same_numbers():
    model, batches = _tiny(CNN)
    fast = importance.removal_loss_change(model, batches, F.cross_entropy)
    full = importance.removal_loss_change(model, batches, F.cross_entropy, downstream_only=False)
    assert fast.keys() == full.keys() and all(torch.equal(fast[k], full[k]) for k in full)
    assert all(full[k].abs().max() > 0 for k in full)


def _signed_loss(logits: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (logits.sum(1) * sign).mean()


def test_taylor_takes_the_absolute_value_per_batch_before_averaging():
    model, batches = _tiny()
    x = batches[0][0]
    plus, minus = torch.ones(len(x)), -torch.ones(len(x))
    # two batches whose gradients are exact opposites: summed first, they would cancel to zero
    scores = importance.taylor(model, [(x, plus), (x, minus)], _signed_loss)
    model.zero_grad()
    _signed_loss(model(x), plus).backward()
    for u in units(model):
        one = (u.layer.weight * u.layer.weight.grad).sum(1) + u.layer.bias * u.layer.bias.grad
        assert torch.allclose(scores.units[u.name], one.abs().detach(), atol=1e-6)
        assert scores.units[u.name].sum() > 0
    layers = prunable_layers(model)  # the per-weight scores (unstructured pruning's) likewise, weight by weight
    assert scores.weights.keys() == layers.keys()
    for name, layer in layers.items():
        assert torch.allclose(scores.weights[name], (layer.weight * layer.weight.grad).abs().detach(), atol=1e-6)
        assert scores.weights[name].sum() > 0


def test_taylor_weighs_each_batch_by_its_samples():
    """A last batch of one sample counted as much as one of 47: its score, the noisiest, was half the mean."""
    model, ((x, y), _) = _tiny(n=96)
    big, small = (x[:-1], y[:-1]), (x[-1:], y[-1:])
    both = importance.taylor(model, [big, small], F.cross_entropy)
    alone = [importance.taylor(model, [b], F.cross_entropy) for b in (big, small)]
    for kind in ("units", "weights"):
        got, b, s = (getattr(scores, kind) for scores in (both, *alone))
        for name in got:
            assert torch.allclose(got[name], (47 * b[name] + s[name]) / 48, atol=1e-6)
            assert not torch.allclose(got[name], (b[name] + s[name]) / 2, atol=1e-6)


def test_fisher_averages_squared_per_sample_gradients_over_every_sample():
    model, batches = _tiny()
    scores = importance.fisher(model, batches, F.cross_entropy)
    found = units(model)  # an mlp: each unit is one layer, named as it is
    expected_u = {u.name: torch.zeros(u.size) for u in found}
    expected_w = {u.name: torch.zeros_like(u.layer.weight) for u in found}
    n = 0
    for x, y in batches:
        for i in range(len(y)):  # one sample at a time: the slow, obvious way
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for u in found:
                w, b = u.layer.weight, u.layer.bias
                expected_u[u.name] += ((w * w.grad).sum(1) + b * b.grad).detach() ** 2
                expected_w[u.name] += w.grad.detach() ** 2
            n += 1
    for u in found:
        assert torch.allclose(scores.units[u.name], 0.5 * expected_u[u.name] / n, rtol=1e-4, atol=1e-9)
        w = u.layer.weight.detach()
        assert torch.allclose(scores.weights[u.name], 0.5 * w**2 * expected_w[u.name] / n, rtol=1e-4, atol=1e-9)


def test_fisher_takes_a_batch_in_pieces_its_memory_allows_and_scores_the_same(monkeypatch):
    """Every sample's gradient of the whole model at once: 5.7 GB for a full-width ResNet-18's batch of 128."""
    model, batches = _tiny(CNN)
    whole = importance.fisher(model, batches, F.cross_entropy)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(importance, "FISHER_BYTES", 5 * size)  # five samples' gradients, at most
    seen, vmap = [], torch.func.vmap

    def spied(fn, *args, **kwargs):
        per_sample = vmap(fn, *args, **kwargs)
        return lambda params, x, y: seen.append(len(y)) or per_sample(params, x, y)

    monkeypatch.setattr(torch.func, "vmap", spied)
    pieces = importance.fisher(model, batches, F.cross_entropy)
    assert seen == [5, 5, 5, 5, 4] * 2  # two batches of 24
    for kind in ("units", "weights"):
        for name, value in getattr(whole, kind).items():
            assert torch.allclose(getattr(pieces, kind)[name], value, rtol=1e-5, atol=1e-10)


def test_fisher_on_a_conv_net_with_batchnorm_gates_runs_per_sample():
    model, batches = _tiny(CNN)
    one = importance.fisher(model, batches[:1], F.cross_entropy)
    x, y = batches[0]
    halves = importance.fisher(model, [(x[:12], y[:12]), (x[12:], y[12:])], F.cross_entropy)
    for k in one.units:  # batching does not change a per-sample statistic
        assert torch.allclose(one.units[k], halves.units[k], rtol=1e-4, atol=1e-10)


def test_magnitude_scores_known_values():
    model, batches = _tiny()
    layer = model.classifier[0][0]
    with torch.no_grad():
        layer.weight.copy_(torch.arange(20, dtype=torch.float32).view(5, 4) - 10)
    l1, l2 = importance.l1(model, batches, F.cross_entropy), importance.l2(model, batches, F.cross_entropy)
    rows = torch.arange(20, dtype=torch.float32).view(5, 4) - 10
    assert torch.equal(l1.units["classifier.0.0"], rows.abs().sum(1))
    assert torch.allclose(l2.units["classifier.0.0"], rows.pow(2).sum(1).sqrt())
    assert torch.equal(l1.weights["classifier.0.0"], rows.abs())
    assert torch.equal(l2.weights["classifier.0.0"], rows.pow(2))


def test_activation_and_apoz_known_values():
    model = build_model({**MLP, "image_size": 1, "hidden": [2]})
    layer = model.classifier[0][0]
    with torch.no_grad():  # unit 0 = relu(x), unit 1 = relu(-x)
        layer.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        layer.bias.zero_()
    x = torch.tensor([1.0, 2.0, -4.0, 3.0]).view(4, 1, 1, 1)
    batches = [(x[:3], torch.zeros(3, dtype=torch.long)), (x[3:], torch.zeros(1, dtype=torch.long))]
    act = importance.activation(model, batches, F.cross_entropy).units["classifier.0.0"]
    apoz = importance.apoz(model, batches, F.cross_entropy).units["classifier.0.0"]
    assert torch.allclose(act, torch.tensor([6.0 / 4, 4.0 / 4]))
    assert torch.allclose(apoz, torch.tensor([1 - 1 / 4, 1 - 3 / 4]))


def test_a_residual_stream_is_scored_over_every_layer_that_makes_it():
    model = tiny("resnet")
    x = _batches(SPECS["resnet"])[0][0]
    stream = {u.name: u for u in units(model)}["blocks.1.conv2"]
    block = model.blocks[1]
    l1 = importance.l1(model, [], F.cross_entropy)
    rows = lambda w: w.detach().abs().flatten(1).sum(1)  # noqa: E731
    assert torch.allclose(l1.units["blocks.1.conv2"], rows(block.conv2.weight) + rows(block.shortcut[0].weight))
    assert stream.act is block.bn2
    # at the stem, the stream's activation is exactly ReLU of the stem's BatchNorm
    act = importance.activation(model, [(x, torch.zeros(len(x), dtype=torch.long))], F.cross_entropy)
    with torch.no_grad():
        expected = model.stem(x).mean((0, 2, 3))
    assert torch.allclose(act.units["stem.0"], expected, atol=1e-6)
    assert torch.equal(act.weights["blocks.0.conv2"], act.units["stem.0"].view(-1, 1, 1, 1).expand(8, 8, 3, 3))


def test_random_is_reproducible_from_the_seed():
    model, batches = _tiny()
    a, b, c = (importance.random(model, batches, F.cross_entropy, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a.units[k], b.units[k]) for k in a.units)
    assert not all(torch.equal(a.units[k], c.units[k]) for k in a.units)


def _batches(spec: dict, n: int = 16, seed: int = 1, device: str = "cpu") -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g)
    y = torch.randint(0, spec["num_classes"], (n,), generator=g)
    return [(x[: n // 2].to(device), y[: n // 2].to(device)), (x[n // 2:].to(device), y[n // 2:].to(device))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(importance.SCORERS))
def test_every_criterion_scores_every_unit_and_every_prunable_weight(method, arch):
    model = tiny(arch)
    scores = importance.SCORERS[method](model, _batches(SPECS[arch]), F.cross_entropy, seed=0, probes=2)
    assert list(scores.units) == [u.name for u in units(model)]
    assert list(scores.weights) == list(prunable_layers(model))
    for u in units(model):
        assert scores.units[u.name].shape == (u.size,)
        assert torch.isfinite(scores.units[u.name]).all()
        if method != "hessian":  # an OBD saliency is negative where the curvature is
            assert (scores.units[u.name] >= 0).all()
    for name, layer in prunable_layers(model).items():
        assert scores.weights[name].shape == layer.weight.shape and torch.isfinite(scores.weights[name]).all()
    back = importance.from_tensors(importance.to_tensors(scores))
    assert all(torch.equal(back.units[k], scores.units[k]) for k in scores.units)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["resnet", "mobilenet_v2"])
def test_every_criterion_runs_on_a_cuda_model_and_returns_cpu_scores(arch):
    model = tiny(arch).cuda()
    batches = _batches(SPECS[arch], device="cuda")
    on_cpu = importance.SCORERS["taylor"](tiny(arch), _batches(SPECS[arch]), F.cross_entropy)
    for method, scorer in importance.SCORERS.items():
        scores = scorer(model, batches, F.cross_entropy, seed=0, probes=2)
        assert all(v.device.type == "cpu" for v in [*scores.units.values(), *scores.weights.values()]), method
    scores = importance.SCORERS["taylor"](model, batches, F.cross_entropy)
    assert all(torch.allclose(scores.units[k], on_cpu.units[k], rtol=1e-3, atol=1e-6) for k in on_cpu.units)
    truth = importance.removal_loss_change(model, batches, F.cross_entropy)
    assert set(truth) == {u.name for u in units(model)}


def test_agreement_is_one_for_the_truth_itself():
    truth = {"a": torch.tensor([0.1, 0.5, 0.2, 0.9]), "b": torch.tensor([0.3, 0.0])}
    assert importance.agreement(truth, truth) == {"spearman": pytest.approx(1.0), "topk_overlap": 1.0}
    reverse = {k: -v for k, v in truth.items()}
    assert importance.agreement(reverse, truth)["spearman"] == pytest.approx(-1.0)


def test_the_hessians_halves_apart_are_what_one_generator_through_both_gives():
    """hessian_units draws hessian_weights' signs again rather than taking them over: the numbers must be
    those of one generator drawn through the diagonal, then through the units."""
    model, batches = _tiny(CNN)
    weights = list(importance._weights(model).values())
    g = torch.Generator().manual_seed(3)
    diag = importance.hessian_diagonal(model, weights, batches, F.cross_entropy, 4, g)
    quad = importance.unit_quadratic(model, units(model), batches, F.cross_entropy, 4, g)
    by_weight = importance.hessian_weights(model, batches, F.cross_entropy, seed=3, probes=4)
    by_unit = importance.hessian_units(model, batches, F.cross_entropy, seed=3, probes=4)
    assert all(torch.equal(by_weight[n], 0.5 * d * w.detach() ** 2)
               for n, w, d in zip(by_weight, weights, diag, strict=True))
    assert list(by_unit) == list(quad) and all(torch.equal(by_unit[k], 0.5 * quad[k]) for k in quad)


def test_scoring_on_two_processes_gives_the_bytes_of_one():
    """score_all cuts the criteria and the oracle into pieces (the Hessian's halves, the oracle unit layer
    by unit layer) for forked workers; every number must be the one a single process computes."""
    from types import SimpleNamespace

    from kdprune import scoring
    from kdprune.data import Normaliser, Split, materialise

    model, _ = _tiny(CNN)
    g = torch.Generator().manual_seed(5)
    split = Split(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g),
                  torch.randint(0, 4, (40,), generator=g))
    norm = Normaliser(255.0, (0.5,), (0.25,))
    cfg = SimpleNamespace(methods=sorted(importance.SCORERS), samples=32, batch_size=16, probes=3,
                          oracle_samples=24, oracle_split="train")
    one = scoring.score_all(model, split, norm, cfg, 7, held=split, processes=1)
    two = scoring.score_all(model, split, norm, cfg, 7, held=split, processes=2)
    whole = scoring.oracle(model, split, norm, cfg, 7)
    for scores, truth in (one, two):
        assert list(scores) == cfg.methods and list(truth) == [u.name for u in units(model)]
        assert all(torch.equal(truth[k], whole[k]) for k in whole)
        for method, s in scores.items():
            mine, theirs = importance.to_tensors(s), importance.to_tensors(one[0][method])
            assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), method
    direct = importance.hessian(model, materialise(split, 16, norm, 32, 7), F.cross_entropy, seed=7, probes=3)
    assert all(torch.equal(two[0]["hessian"].units[k], direct.units[k]) for k in direct.units)
    assert all(torch.equal(two[0]["hessian"].weights[k], direct.weights[k]) for k in direct.weights)
