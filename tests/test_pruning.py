"""Pruning: which units go, that removing them equals masking them, and that masks stay fixed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdprune import pruning
from kdprune.checkpoints import load_model, save_model
from kdprune.models import build_model, count_params, prunable_layers, spec_of, units
from kdprune.training import l1_penalty
from tests.conftest import randomised
from tests.test_models import half, tiny

def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, l1: float = 0.0) -> None:
    """A plain Adam loop (training.fit's job, kept out of these tests so they test pruning alone)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(16):
            optimizer.zero_grad()
            (F.cross_entropy(model(x[idx]), y[idx]) + l1 * l1_penalty(model)).backward()
            optimizer.step()
    model.eval()


CNN = {"arch": "cnn", "in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [8, 16], "hidden": [12]}
MLP = {"arch": "mlp", "in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [], "hidden": [16, 8]}


@pytest.mark.parametrize("spec", [CNN, MLP], ids=["cnn", "mlp"])
def test_structurally_pruned_model_equals_its_masked_original(spec):
    model = randomised(spec)
    x = torch.randn(16, 1, 8, 8)
    remove = half(model)
    masked = copy.deepcopy(model)
    pruning.mask_units(masked, remove)
    pruning.remove_units(model, remove)
    assert [u.size for u in units(model)] == [u.size - len(remove[u.name]) for u in units(masked)]
    assert count_params(model) < count_params(masked)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), rtol=1e-4, atol=1e-5)


def test_pruned_model_save_load_round_trip(tmp_path):
    model = randomised(CNN)
    x = torch.randn(4, 1, 8, 8)
    pruning.remove_units(model, half(model))
    save_model(tmp_path, model, CNN)
    loaded, spec = load_model(tmp_path)
    assert spec == {**CNN, "width": 1.0, "widths": {"features.0.0": 4, "features.1.0": 8, "classifier.0.0": 6}}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_global_selection_removes_the_amount_and_keeps_one_unit_per_layer():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.tensor([10.0, 20.0]), "c": torch.tensor([5.0, 1.0, 9.0])}
    chosen = pruning.select_units(scores, 0.5, "global")
    assert sum(len(v) for v in chosen.values()) == int(0.5 * 9)
    # after mean-normalising, a's lowest (0.4 of its mean) and c's 1.0 (0.2 of its mean) go first
    assert 1 in chosen["c"].tolist() and 0 in chosen["a"].tolist()
    almost_all = pruning.select_units(scores, 0.99, "global")
    assert all(len(almost_all[k]) == len(v) - 1 for k, v in scores.items())


def test_layer_selection_prunes_each_layer_by_the_amount():
    scores = {"a": torch.tensor([4.0, 1.0, 3.0, 2.0]), "b": torch.tensor([1.0, 2.0])}
    chosen = pruning.select_units(scores, 0.5, "layer")
    assert chosen["a"].tolist() == [1, 3] and chosen["b"].tolist() == [0]
    assert pruning.select_units(scores, 0.99, "layer")["b"].tolist() == [0]


def test_global_normalisation_is_scale_free_per_layer():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    scaled = {"a": scores["a"], "b": scores["b"] * 1000}
    assert {k: v.tolist() for k, v in pruning.select_units(scores, 0.34, "global").items()} == \
        {k: v.tolist() for k, v in pruning.select_units(scaled, 0.34, "global").items()}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_weight_selection_zeroes_the_amount_and_spares_a_weight_per_unit(scope):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(6, 10, generator=g), "b": torch.rand(4, 3, 3, 3, generator=g) * 100}
    masks = pruning.select_weights(scores, 0.8, scope)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs((total - kept) / total - 0.8) < 0.05
    for m in masks.values():
        assert m.reshape(m.shape[0], -1).any(1).all()


def test_unstructured_masks_stay_fixed_through_fine_tuning():
    model = randomised(MLP)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(m.weight.shape, generator=g) for n, m in prunable_layers(model).items()}
    masks = pruning.prune(model, {}, scores, 0.7, "global", False)
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    assert all(torch.equal(before[k] == 0, ~masks[k]) for k in masks)
    pruning.apply_weight_masks(model, masks)
    _train(model, torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)), epochs=3)
    pruning.bake_weight_masks(model)
    for n, m in prunable_layers(model).items():
        w = m.weight.detach()
        assert torch.all(w[~masks[n]] == 0)
        assert not torch.equal(w[masks[n]], before[n][masks[n]])  # the rest did train
    assert set(model.state_dict()) == set(build_model(MLP).state_dict())


def test_prune_refuses_scores_for_other_layers():
    model = randomised(CNN)
    with pytest.raises(ValueError, match="scores are for layers"):
        pruning.prune(model, {"nope": torch.ones(3)}, {}, 0.5, "global", True)
    with pytest.raises(ValueError, match="scores for features.0.0 have shape"):
        pruning.prune(model, {u.name: torch.ones(3) for u in units(model)}, {}, 0.5, "global", True)


def _magnitude(model: torch.nn.Module) -> tuple[dict, dict]:
    return ({u.name: u.layer.weight.detach().abs().reshape(u.size, -1).sum(1) for u in units(model)},
            {n: m.weight.detach().abs() for n, m in prunable_layers(model).items()})


def test_iterative_unstructured_masks_only_grow_and_reach_the_amount():
    model = randomised(MLP)
    seen: list[dict] = []

    def recover(m: torch.nn.Module) -> None:  # a stand-in fine-tune that moves every weight it may
        seen.append({n: layer.weight.detach().clone() for n, layer in prunable_layers(m).items()})
        with torch.no_grad():
            for layer in prunable_layers(m).values():
                layer.weight.add_(0.5)

    masks = pruning.iterative_prune(model, _magnitude, 0.9, 3, "global", False, recover)
    assert len(seen) == 2  # between rounds, not after the last
    for n, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        assert torch.all(w[~masks[n]] == 0)
        for before in seen:  # zero in an earlier round -> still zero now
            assert torch.all(w[before[n] == 0] == 0)
    total = sum(m.numel() for m in masks.values())
    assert abs(1 - sum(int(m.sum()) for m in masks.values()) / total - 0.9) < 0.03


def test_iterative_structured_pruning_reaches_the_amount_in_rounds():
    model = randomised(CNN)
    sizes = []
    n0 = sum(u.size for u in units(model))
    pruning.iterative_prune(model, _magnitude, 0.75, 2, "global", True,
                            lambda m: sizes.append(sum(u.size for u in units(m))))
    assert sizes == [n0 - int(0.5 * n0)]  # round 1: 1 - (1 - 0.75) ** 0.5 = half of the units
    assert abs(sum(u.size for u in units(model)) - 0.25 * n0) <= 2


def test_l1_training_shrinks_batchnorm_scales():
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    norms = {}
    for l1 in (0.0, 0.05):
        model = randomised(CNN)
        _train(model, x, y, epochs=10, l1=l1)
        norms[l1] = sum(m.weight.abs().sum().item() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert norms[0.05] < 0.7 * norms[0.0]


def test_allocation_spends_the_amount_where_accuracy_is_cheapest():
    fragile = [1.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    robust = [1.0, 1.0, 1.0, 0.99, 0.98, 0.97, 0.9, 0.8, 0.6, 0.4]
    counts = pruning.allocate({"a": fragile, "b": robust}, {"a": 10, "b": 10}, 0.25)
    assert counts == {"a": 0, "b": 5}
    everything = pruning.allocate({"a": fragile, "b": robust}, {"a": 10, "b": 10}, 0.99)
    assert everything == {"a": 9, "b": 9}  # every layer keeps one unit


def test_sensitivity_curves_start_at_the_intact_accuracy_and_prune_by_scores():
    model = randomised(CNN)
    x = torch.randn(32, 1, 8, 8)
    reference = model(x).detach()
    agreement = lambda m: (m(x).argmax(1) == reference.argmax(1)).float().mean().item()  # noqa: E731
    scores = {u.name: torch.arange(u.size, dtype=torch.float32) for u in units(model)}
    curves = pruning.sensitivity(model, scores, agreement)
    assert set(curves) == {u.name for u in units(model)}
    assert all(len(c) == len(pruning.FRACTIONS) and c[0] == 1.0 for c in curves.values())
    assert min(min(c) for c in curves.values()) < 1.0  # masking did take effect
    assert torch.equal(model(x), reference)  # masked in place, and every gate restored
    for u in units(model):  # each point: that layer's lowest-scored channels masked, and nothing else
        for f, point in zip(pruning.FRACTIONS, curves[u.name]):
            masked = copy.deepcopy(model)
            k = max(0, min(pruning.share(f, u.size), u.size - u.min_size))
            pruning.mask_units(masked, {u.name: torch.arange(k)})  # the scores rank channel i i-th lowest
            assert agreement(masked) == point, (u.name, f)


def test_sensitivity_scope_prunes_the_amount_and_stays_equivalent_to_masking():
    model = randomised(CNN)
    x = torch.randn(32, 1, 8, 8)
    reference = model(x).detach()
    agreement = lambda m: (m(x).argmax(1) == reference.argmax(1)).float().mean().item()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    scores = {u.name: torch.rand(u.size, generator=g) for u in units(model)}
    sizes = {u.name: u.size for u in units(model)}
    original = copy.deepcopy(model)
    pruning.prune(model, scores, {}, 0.5, "sensitivity", True, agreement)
    left = {u.name: u.size for u in units(model)}
    n0 = sum(sizes.values())
    assert sum(left.values()) == n0 - int(0.5 * n0)
    assert len({left[n] / sizes[n] for n in sizes}) > 1  # spread by sensitivity, not the same share everywhere
    # each layer lost its lowest-scored units, and the smaller model computes what masking them computes
    lowest = {n: scores[n].argsort(stable=True)[: sizes[n] - left[n]].sort().values for n in sizes}
    pruning.mask_units(original, lowest)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), rtol=1e-4, atol=1e-5)


def test_weight_selection_hits_the_amount_exactly_when_scores_tie():
    scores = {"a": torch.ones(4, 5), "b": torch.ones(2, 5) * 3}  # every weight of a layer tied
    for scope in ("global", "layer"):
        masks = pruning.select_weights(scores, 0.3, scope)
        dropped = sum(int((~m).sum()) for m in masks.values())
        # the 9 (or 6 + 3) lowest by position; a row emptied by that keeps one weight back
        assert dropped == (9 - 1 if scope == "global" else 6 - 1 + 3), scope


def test_kept_width_rounds_to_the_nearest_multiple_or_keeps_the_whole_unit():
    assert [pruning.kept_width(64, k, 8) for k in (1, 4, 5, 12, 13, 60, 64)] == [8, 8, 8, 16, 16, 64, 64]
    assert pruning.kept_width(12, 11, 8) == 12 and pruning.kept_width(12, 9, 8) == 8  # 12 is whole: allowed
    assert pruning.kept_width(6, 1, 8) == 6  # smaller than round_to: left whole
    assert pruning.kept_width(10, 0, 1, least=2) == 2
    with pytest.raises(ValueError, match="round_to"):
        pruning.kept_width(10, 5, 0)


def test_unit_selection_with_round_to_keeps_multiples_and_respects_least_sizes():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(64, generator=g), "b": torch.rand(20, generator=g), "c": torch.rand(6, generator=g)}
    for scope in ("global", "layer"):
        chosen = pruning.select_units(scores, 0.5, scope, round_to=8)
        kept = {k: len(v) - len(chosen[k]) for k, v in scores.items()}
        assert kept["a"] % 8 == 0 and kept["b"] in (8, 16, 20) and kept["c"] == 6, (scope, kept)
        assert all(torch.equal(chosen[k], scores[k].argsort()[: len(chosen[k])].sort().values) for k in scores)
    assert len(pruning.select_units({"d": torch.rand(4)}, 0.99, "global", min_sizes={"d": 2})["d"]) == 2


def test_allocation_with_round_to_snaps_each_count():
    flat = [1.0] * 10
    counts = pruning.allocate({"a": flat, "b": flat}, {"a": 32, "b": 6}, 0.5, round_to=8)
    assert (32 - counts["a"]) % 8 == 0 and counts["b"] == 0


def test_iterative_structured_pruning_with_round_to_keeps_multiples():
    spec = {**CNN, "channels": [32, 24], "hidden": [20]}
    model = randomised(spec)
    pruning.iterative_prune(model, _magnitude, 0.7, 2, "global", True, lambda m: None, round_to=8)
    widths = spec_of(model, spec)["widths"]
    assert all(w % 8 == 0 or w == 20 for w in widths.values()) and sum(widths.values()) < 76, widths


def test_an_amount_whose_share_is_whole_removes_that_many_though_the_float_product_falls_short():
    """0.7 * 90 is 62.99999999999999 and int() made it 62; one round of iterative_prune (the prune stage's
    default) turned 0.1 into 0.09999999999999998 on its way through 1 - (1 - amount), and removed 1 of 20."""
    scores = {"a": torch.arange(90.0)}
    assert [len(pruning.select_units(scores, 0.7, scope)["a"]) for scope in ("layer", "global")] == [63, 63]
    assert pruning.allocate({"a": [1.0] * 10}, {"a": 90}, 0.7)["a"] == 63
    spread = torch.arange(90.0).view(10, 9).t()  # (9, 10): each row's lowest 7 are among the lowest 63
    assert int((~pruning.select_weights({"w": spread}, 0.7, "global")["w"]).sum()) == 63
    model = randomised({**CNN, "channels": [4, 8], "hidden": [8]})
    pruning.iterative_prune(model, _magnitude, 0.1, 1, "global", True, lambda m: None)
    assert sum(u.size for u in units(model)) == 18


def test_round_one_prunes_by_the_sensitivity_curves_already_measured(monkeypatch):
    """prune.scope sensitivity: the prune stage measured round 1's curves (ten validation passes a unit),
    then iterative_prune measured the same curves again."""
    model, x = randomised(CNN), torch.randn(32, 1, 8, 8)
    reference = model(x).detach()
    agreement = lambda m: (m(x).argmax(1) == reference.argmax(1)).float().mean().item()  # noqa: E731
    curves = pruning.sensitivity(model, _magnitude(model)[0], agreement)
    measured = copy.deepcopy(model)
    pruning.iterative_prune(measured, _magnitude, 0.5, 2, "sensitivity", True, lambda m: None, agreement)
    calls, measure = [], pruning.sensitivity
    monkeypatch.setattr(pruning, "sensitivity", lambda *a: calls.append(a) or measure(*a))
    pruning.iterative_prune(model, _magnitude, 0.5, 2, "sensitivity", True, lambda m: None, agreement,
                            curves=curves)
    assert len(calls) == 1  # round 2's, of the model round 1 left
    assert [u.size for u in units(model)] == [u.size for u in units(measured)]


def test_iterative_structured_rounds_make_up_in_later_rounds_what_round_to_kept():
    """Rounds are sized from the units left. Sized from the schedule's previous target instead, the rounds
    after one that rounding to 8 had kept at 56 of 76 units (the schedule asks 51) left 48, then 32, against
    the 0.3 * 76 = 23 asked; now 40, then 24, the total of multiples of 8 nearest 23."""
    model = randomised({**CNN, "channels": [32, 24], "hidden": [20]})
    left = []
    pruning.iterative_prune(model, _magnitude, 0.7, 3, "global", True,
                            lambda m: left.append(sum(u.size for u in units(m))), round_to=8)
    assert left + [sum(u.size for u in units(model))] == [56, 40, 24]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruning_a_cuda_model_keeps_it_on_cuda_and_equal_to_its_masked_twin():
    model = tiny("mobilenet_v2").cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    remove = half(model)
    masked = copy.deepcopy(model)
    pruning.mask_units(masked, remove)
    pruning.remove_units(model, remove)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), rtol=1e-3, atol=1e-4)
    scores = {u.name: torch.rand(u.size) for u in units(model)}
    pruning.prune(model, scores, {}, 0.3, "sensitivity", True, lambda m: float(m(x).sum() != 0), round_to=2)
    weights = {n: torch.rand(m.weight.shape) for n, m in prunable_layers(model).items()}
    masks = pruning.prune(model, {}, weights, 0.5, "global", False)
    assert all(p.is_cuda for p in model.parameters()) and model(x).shape == (4, 4)
    assert all(torch.all(m.weight[~masks[n].cuda()] == 0) for n, m in prunable_layers(model).items())
