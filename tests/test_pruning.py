"""Pruning: which units go, that removing them equals masking them, and that masks stay fixed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdprune import pruning
from kdprune.checkpoints import load_model, save_model
from kdprune.models import build_model, count_params
from kdprune.training import fit
from tests.conftest import half_removal, randomised

CNN = {"arch": "cnn", "in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [8, 16], "hidden": [12]}
MLP = {"arch": "mlp", "in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [], "hidden": [16, 8]}


@pytest.mark.parametrize("spec", [CNN, MLP], ids=["cnn", "mlp"])
def test_structurally_pruned_model_equals_its_masked_original(spec):
    model = randomised(spec)
    x = torch.randn(16, 1, 8, 8)
    remove = half_removal(model)
    masked = copy.deepcopy(model)
    pruning.mask_units(masked, remove)
    pruning.remove_units(model, x[:1], remove)
    assert [u.size for u in model.units()] == [u.size - len(remove[u.name]) for u in masked.units()]
    assert count_params(model) < count_params(masked)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), rtol=1e-4, atol=1e-5)


def test_pruned_model_save_load_round_trip(tmp_path):
    model = randomised(CNN)
    x = torch.randn(4, 1, 8, 8)
    pruning.remove_units(model, x[:1], half_removal(model))
    save_model(tmp_path, model, CNN)
    loaded, spec = load_model(tmp_path)
    assert spec["channels"] == [4, 8] and spec["hidden"] == [6]
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
    scores = {u.name: torch.rand(u.layer.weight.shape, generator=g) for u in model.units()}
    masks = pruning.prune(model, {}, scores, 0.7, "global", False, torch.randn(1, 1, 8, 8))
    before = {u.name: u.layer.weight.detach().clone() for u in model.units()}
    assert all(torch.equal(before[k] == 0, ~masks[k]) for k in masks)
    pruning.apply_weight_masks(model, masks)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))

    class Cfg:
        epochs, batch_size, optimizer, lr, weight_decay = 3, 16, "adam", 0.01, 0.0

    fit(model, (x, y), (x, y), F.cross_entropy, Cfg, seed=0, device=torch.device("cpu"))
    pruning.bake_weight_masks(model)
    for u in model.units():
        w = u.layer.weight.detach()
        assert torch.all(w[~masks[u.name]] == 0)
        assert not torch.equal(w[masks[u.name]], before[u.name][masks[u.name]])  # the rest did train
    assert set(model.state_dict()) == set(build_model(MLP).state_dict())


def test_prune_refuses_scores_for_other_layers():
    model = randomised(CNN)
    with pytest.raises(ValueError, match="scores are for layers"):
        pruning.prune(model, {"nope": torch.ones(3)}, {}, 0.5, "global", True, torch.randn(1, 1, 8, 8))


def _magnitude(model: torch.nn.Module) -> tuple[dict, dict]:
    units = model.units()
    return ({u.name: u.layer.weight.detach().abs().reshape(u.size, -1).sum(1) for u in units},
            {u.name: u.layer.weight.detach().abs() for u in units})


def test_iterative_unstructured_masks_only_grow_and_reach_the_amount():
    model = randomised(MLP)
    seen: list[dict] = []

    def recover(m: torch.nn.Module) -> None:  # a stand-in fine-tune that moves every weight it may
        seen.append({u.name: u.layer.weight.detach().clone() for u in m.units()})
        with torch.no_grad():
            for u in m.units():
                u.layer.weight.add_(0.5)

    masks = pruning.iterative_prune(model, _magnitude, 0.9, 3, "global", False, torch.randn(1, 1, 8, 8), recover)
    assert len(seen) == 2  # between rounds, not after the last
    for u in model.units():
        w = u.layer.weight.detach()
        assert torch.all(w[~masks[u.name]] == 0)
        for before in seen:  # zero in an earlier round -> still zero now
            assert torch.all(w[before[u.name] == 0] == 0)
    total = sum(m.numel() for m in masks.values())
    assert abs(1 - sum(int(m.sum()) for m in masks.values()) / total - 0.9) < 0.03


def test_iterative_structured_pruning_reaches_the_amount_in_rounds():
    model = randomised(CNN)
    sizes = []
    n0 = sum(u.size for u in model.units())
    pruning.iterative_prune(model, _magnitude, 0.75, 2, "global", True, torch.randn(1, 1, 8, 8),
                            lambda m: sizes.append(sum(u.size for u in m.units())))
    assert sizes == [n0 - int(0.5 * n0)]  # round 1: 1 - (1 - 0.75) ** 0.5 = half of the units
    assert abs(sum(u.size for u in model.units()) - 0.25 * n0) <= 2


def test_l1_training_shrinks_batchnorm_scales():
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))

    class Cfg:
        epochs, batch_size, optimizer, lr, weight_decay = 20, 32, "adam", 0.01, 0.0

    norms = {}
    for l1 in (0.0, 0.05):
        model = randomised(CNN)
        fit(model, (x, y), (x, y), F.cross_entropy, Cfg, seed=0, device=torch.device("cpu"), l1=l1)
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
    scores = {u.name: torch.arange(u.size, dtype=torch.float32) for u in model.units()}
    curves = pruning.sensitivity(model, scores, agreement)
    assert set(curves) == {u.name for u in model.units()}
    assert all(len(c) == len(pruning.FRACTIONS) and c[0] == 1.0 for c in curves.values())
    assert torch.equal(model(x), reference)  # measured on copies


def test_sensitivity_scope_prunes_the_amount_and_stays_equivalent_to_masking():
    model = randomised(CNN)
    x = torch.randn(32, 1, 8, 8)
    reference = model(x).detach()
    agreement = lambda m: (m(x).argmax(1) == reference.argmax(1)).float().mean().item()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    scores = {u.name: torch.rand(u.size, generator=g) for u in model.units()}
    n0 = sum(u.size for u in model.units())
    pruning.prune(model, scores, {}, 0.5, "sensitivity", True, x[:1], agreement)
    assert sum(u.size for u in model.units()) == n0 - int(0.5 * n0)


def test_weight_selection_hits_the_amount_exactly_when_scores_tie():
    scores = {"a": torch.ones(4, 5), "b": torch.ones(2, 5) * 3}  # every weight of a layer tied
    for scope in ("global", "layer"):
        masks = pruning.select_weights(scores, 0.3, scope)
        dropped = sum(int((~m).sum()) for m in masks.values())
        # the 9 (or 6 + 3) lowest by position; a row emptied by that keeps one weight back
        assert dropped == (9 - 1 if scope == "global" else 6 - 1 + 3), scope
