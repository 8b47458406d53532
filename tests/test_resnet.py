"""ResNet: coupled residual channels are one unit, removing units equals masking them, criteria run on it."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from kdprune import importance, pruning
from kdprune.checkpoints import load_model, save_model
from kdprune.errors import ParamsError
from kdprune.models import build_model, count_params, spec_channels, spec_of
from kdprune.params import load_params
from tests.conftest import half_removal, randomised


def _spec(image_size: int = 8, stages: Sequence[int] = (6, 8, 6), hidden: Sequence[int] = (5,)) -> dict:
    return {"arch": "resnet", "in_channels": 3, "image_size": image_size, "num_classes": 4,
            "channels": spec_channels("resnet", list(stages)), "hidden": list(hidden)}


def _batches(spec: dict, n: int = 32, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g)
    y = torch.randint(0, spec["num_classes"], (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])]


def test_stage_widths_expand_to_one_width_per_prunable_conv_in_unit_order():
    spec = _spec(stages=[6, 8])
    assert spec["channels"] == [6, 6, 8, 8]
    model = build_model(spec)
    assert [u.name for u in model.units()] == ["stem.0", "blocks.0.conv1", "blocks.1.shortcut.0",
                                               "blocks.1.conv1", "classifier.0.0"]
    assert spec_of(model, spec) == spec
    stream = model.units()[2]
    block = model.blocks[1]
    assert stream.gates == (block.shortcut[1].weight, block.shortcut[1].bias, block.bn2.weight, block.bn2.bias)
    assert stream.act is block.relu and stream.size == 8
    with pytest.raises(ValueError, match="width pairs"):
        build_model({**spec, "channels": [6, 6, 8]})


@pytest.mark.parametrize("image_size", [8, 32])
def test_structurally_pruned_resnet_equals_its_masked_original(image_size):
    spec = _spec(image_size)
    model = randomised(spec)
    x = torch.randn(8, 3, image_size, image_size)
    remove = half_removal(model)
    masked = copy.deepcopy(model)
    pruning.mask_units(masked, remove)
    pruning.remove_units(model, x[:1], remove)
    assert [u.size for u in model.units()] == [u.size - len(remove[u.name]) for u in masked.units()]
    # the coupled channels went with the stream: the stem's, block 0's conv2 and the next block's inputs
    assert model.stem[0].out_channels == model.blocks[0].conv2.out_channels == model.blocks[0].bn2.num_features == 3
    assert model.blocks[1].conv1.in_channels == model.blocks[1].shortcut[0].in_channels == 3
    assert model.blocks[1].conv2.out_channels == model.blocks[1].shortcut[0].out_channels == 4
    assert count_params(model) < count_params(masked)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), rtol=1e-4, atol=1e-5)
    assert count_params(build_model(spec_of(model, spec))) == count_params(model)


def test_pruned_resnet_save_load_round_trip(tmp_path):
    spec = _spec(32)
    model = randomised(spec)
    x = torch.randn(4, 3, 32, 32)
    pruning.remove_units(model, x[:1], half_removal(model))
    save_model(tmp_path, model, spec)
    loaded, saved = load_model(tmp_path)
    assert saved["channels"] == [3, 3, 4, 4, 3, 3] and saved["hidden"] == [3]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name", ["stem.0", "blocks.1.shortcut.0", "blocks.1.conv1"])
def test_removal_loss_change_is_the_loss_with_the_channel_removed(name):
    spec = _spec(stages=[3, 4], hidden=[])  # no hidden layer whose dead ReLUs would hide the stream
    model, batches = randomised(spec), _batches(spec)
    truth = importance.removal_loss_change(model, batches, F.cross_entropy)
    assert truth[name].abs().max() > 1e-3  # some channel matters, so agreement is not 0 == 0
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    base = F.cross_entropy(model(x), y).item()
    for j in range(len(truth[name])):  # the graph is traced with autograd on: no torch.no_grad() here
        pruned = pruning.remove_units(copy.deepcopy(model), x[:1], {name: torch.tensor([j])})
        assert truth[name][j].item() == pytest.approx(F.cross_entropy(pruned(x), y).item() - base, abs=1e-5)


def test_params_accept_a_resnet_and_want_a_stage_width(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("student: {arch: resnet, channels: [16, 32], hidden: []}\n")
    assert load_params(path).student.arch == "resnet"
    path.write_text("student: {arch: resnet, channels: [], hidden: []}\n")
    with pytest.raises(ParamsError, match="student.channels: a resnet needs at least one stage width"):
        load_params(path)
