"""Architectures: units found by the dependency graph, masking equals removing, widths, specs and their bounds."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from kdprune import importance, models, pruning
from kdprune.checkpoints import load_model, save_model
from kdprune.models import (build_model, count_params, model_size_on_meta, prunable_layers, remove_units, spec_of,
                            units)
from tests.conftest import randomised

TV = {"in_channels": 3, "image_size": 8, "num_classes": 4, "channels": [], "hidden": [], "width": 0.125}
SPECS = {
    "cnn": {"arch": "cnn", "in_channels": 1, "image_size": 8, "num_classes": 4, "channels": [8, 16], "hidden": [12]},
    "mlp": {"arch": "mlp", "in_channels": 1, "image_size": 8, "num_classes": 4, "channels": [], "hidden": [16, 9]},
    "resnet": {"arch": "resnet", "in_channels": 3, "image_size": 8, "num_classes": 4, "channels": [8, 16, 12],
               "hidden": [10]},
    "resnet18": {"arch": "resnet18", **TV},
    "mobilenet_v2": {"arch": "mobilenet_v2", **TV},
    "vgg11_bn": {"arch": "vgg11_bn", **TV},
}
ARCHS = list(SPECS)


@functools.cache
def _built(arch: str) -> nn.Module:
    return randomised(SPECS[arch])


def tiny(arch: str) -> nn.Module:
    """A small model of `arch` in eval mode with non-trivial BatchNorm statistics (a copy: tests may prune it)."""
    return copy.deepcopy(_built(arch))


def inputs(spec: dict, n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g)


def half(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random half of every unit's channels (as many as it may lose), as remove_units / mask_units take them."""
    g = torch.Generator().manual_seed(seed)
    return {u.name: torch.randperm(u.size, generator=g)[: min(u.size // 2, u.size - u.min_size)].sort().values
            for u in units(model)}


def macs(model: nn.Module) -> int:
    return int(tp.utils.count_ops_and_params(model, torch.zeros(1, *model.input_shape))[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_masking_half_of_every_unit_equals_removing_it(arch):
    model = tiny(arch)
    x = inputs(SPECS[arch])
    remove = half(model)
    masked = copy.deepcopy(model)
    pruning.mask_units(masked, remove)
    remove_units(model, remove)
    assert [u.size for u in units(model)] == [u.size - len(remove[u.name]) for u in units(masked)]
    assert count_params(model) < count_params(masked) and macs(model) < macs(masked)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_structured_pruning_makes_params_and_macs_smaller(arch):
    model = tiny(arch)
    before = (count_params(model), macs(model))
    scores = importance.l1(model, [], F.cross_entropy)
    pruning.prune(model, scores.units, scores.weights, 0.5, "global", True)
    assert count_params(model) < before[0] and macs(model) < before[1]
    assert model(inputs(SPECS[arch])).shape == (8, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pruned_model_saves_and_loads_to_the_same_outputs_and_spec(arch, tmp_path):
    spec, model = SPECS[arch], tiny(arch)
    remove_units(model, half(model))
    save_model(tmp_path, model, spec)
    loaded, saved = load_model(tmp_path)
    assert saved == spec_of(model, spec) == json.loads((tmp_path / "spec.json").read_text())
    assert saved["widths"] == {u.name: u.size for u in units(model)}
    x = inputs(spec)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert model_size_on_meta(saved) == count_params(loaded) == count_params(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_width_multiplier_keeps_round_of_size_times_width_of_every_unit(arch):
    spec = {**SPECS[arch], "width": 1.0}
    full = {u.name: u for u in units(build_model(spec))}
    thin = build_model({**spec, "width": 0.3})
    assert {u.name: u.size for u in units(thin)} == {n: max(u.min_size, round(u.size * 0.3)) for n, u in full.items()}
    assert model_size_on_meta({**spec, "width": 0.3}) == count_params(thin)


def test_the_width_multiplier_on_torchvision_widths():
    widths = spec_of(tiny("resnet18"), SPECS["resnet18"])["widths"]
    assert {k: widths[k] for k in ("conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2")} \
        == {"conv1": 8, "layer1.0.conv1": 8, "layer2.0.conv2": 16, "layer3.0.conv2": 32, "layer4.0.conv2": 64}
    vgg = spec_of(tiny("vgg11_bn"), SPECS["vgg11_bn"])["widths"]
    assert vgg["features.0"] == 8 and vgg["classifier.0"] == models.VGG_CLASSIFIER // 8


@pytest.mark.parametrize("arch", ARCHS)
def test_round_to_leaves_every_pruned_width_a_multiple_of_it(arch):
    model = tiny(arch)
    before = {u.name: u.size for u in units(model)}
    scores = importance.random(model, [], F.cross_entropy, seed=0)
    pruning.prune(model, scores.units, scores.weights, 0.6, "global", True, round_to=8)
    after = {u.name: u.size for u in units(model)}
    pruned = {n: w for n, w in after.items() if w != before[n]}
    assert pruned, "nothing was pruned"
    assert all(w % 8 == 0 and w >= 8 for w in pruned.values()), pruned
    assert all(after[n] == w for n, w in before.items() if w <= 8)  # no smaller than round_to: left whole


# ---------------------------------------------------------------- units, arch by arch

def test_resnet_units_couple_each_stage_stream_and_leave_conv1_alone():
    model = tiny("resnet")
    assert [u.name for u in units(model)] == ["stem.0", "blocks.0.conv1", "blocks.1.conv1", "blocks.1.conv2",
                                              "blocks.2.conv1", "blocks.2.conv2", "classifier.0.0"]
    stream = {u.name: u for u in units(model)}["blocks.1.conv2"]
    block = model.blocks[1]
    assert stream.layers == (block.conv2, block.shortcut[0])
    assert stream.gates == (block.bn2.weight, block.bn2.bias, block.shortcut[1].weight, block.shortcut[1].bias)
    assert stream.act is block.bn2 and stream.size == 16
    # every conv but the head is scored and masked per weight, conv2 included (it is no unit's root)
    assert "blocks.0.conv2" in prunable_layers(model) and "head" not in prunable_layers(model)
    assert "widths" not in spec_of(model, SPECS["resnet"])  # at its base widths: nothing to record
    remove_units(model, {"stem.0": [0]})
    assert spec_of(model, SPECS["resnet"])["widths"]["stem.0"] == 7


def test_resnet_stream_removal_takes_every_coupled_channel():
    model = tiny("resnet")
    remove_units(model, {"stem.0": torch.arange(5), "blocks.1.conv2": torch.arange(4)})
    assert model.stem[0].out_channels == model.blocks[0].conv2.out_channels == model.blocks[0].bn2.num_features == 3
    assert model.blocks[1].conv1.in_channels == model.blocks[1].shortcut[0].in_channels == 3
    assert model.blocks[1].conv2.out_channels == model.blocks[1].shortcut[0].out_channels == 12
    assert model.blocks[2].conv1.in_channels == 12


def test_torchvision_units_follow_residuals_and_depthwise_convs():
    r18 = {u.name: u for u in units(tiny("resnet18"))}
    assert len(r18) == 12  # 4 streams, 8 blocks' conv1
    assert len(r18["conv1"].gates) == 6  # bn1 and layer1's two bn2, all feeding one stream
    mob = tiny("mobilenet_v2")
    stem = units(mob)[0]
    assert stem.name == "features.0.0" and stem.layers == (mob.features[0][0], mob.features[1].conv[0][0])
    assert stem.min_size == 2 and mob.features[1].conv[0][0].groups == stem.size  # the depthwise conv follows
    vgg = tiny("vgg11_bn")
    assert [type(m).__name__ for m in vgg.features if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU))] \
        == ["MaxPool2d"] * 3 + ["Identity"] * 2  # 8 -> 4 -> 2 -> 1, then no further pools
    assert units(vgg)[-1].name == "classifier.0"


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_a_model_with_frozen_parameters_has_the_units_of_its_trainable_twin(arch):
    """The dependency graph is traced through autograd: a frozen layer left no grad_fn and fell out of it (an
    own resnet's frozen stem split a block's conv2 off its residual stream; a model frozen whole had no units)."""
    trainable, frozen = tiny(arch), tiny(arch)
    frozen.requires_grad_(False)
    assert [(u.name, u.size) for u in units(frozen)] == [(u.name, u.size) for u in units(trainable)] != []
    assert not any(q.requires_grad for q in frozen.parameters())  # and left frozen


def test_a_removal_that_cannot_be_made_changes_nothing_and_says_why():
    """Checked unit by unit as it pruned: a bad index for a later unit raised after the earlier ones were
    removed, blaming the least width kept."""
    model = tiny("cnn")
    before = [(u.name, u.size) for u in units(model)]
    with pytest.raises(ValueError, match=r"^classifier\.0\.0: index 12 is out of range for its 12 units$"):
        remove_units(model, {"features.0.0": [0, 1, 2], "classifier.0.0": [12]})
    with pytest.raises(ValueError, match=r"^features\.0\.0: cannot remove 8 of its 8 units; it keeps at least 1$"):
        remove_units(model, {"features.0.0": list(range(8))})
    assert [(u.name, u.size) for u in units(model)] == before


def test_units_are_cached_until_the_shapes_change():
    model = tiny("cnn")
    first = units(model)
    assert all(a is b for a, b in zip(first, units(model)))
    remove_units(model, {"features.0.0": torch.tensor([0])})
    assert units(model)[0].size == 7 and units(model)[0] is not first[0]


def test_the_input_shape_is_a_plain_attribute_not_state():
    model = tiny("resnet18")
    assert model.input_shape == (3, 8, 8)
    assert not any("input_shape" in k for k in model.state_dict())


@pytest.mark.parametrize("name", ["stem.0", "blocks.1.conv2", "blocks.1.conv1"])
def test_removal_loss_change_is_the_loss_with_the_channel_removed(name):
    spec = {**SPECS["resnet"], "channels": [3, 4], "hidden": []}  # no hidden ReLUs to hide the stream
    model = randomised(spec)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    truth = importance.removal_loss_change(model, [(x[:16], y[:16]), (x[16:], y[16:])], F.cross_entropy)
    assert truth[name].abs().max() > 1e-3  # some channel matters, so agreement is not 0 == 0
    base = F.cross_entropy(model(x), y).item()
    for j in range(len(truth[name])):
        pruned = remove_units(copy.deepcopy(model), {name: torch.tensor([j])})
        assert truth[name][j].item() == pytest.approx(F.cross_entropy(pruned(x), y).item() - base, abs=1e-5)


# ---------------------------------------------------------------- specs: checked before anything is allocated

@pytest.fixture
def no_real_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every builder call records the device it built on; a test asserts nothing was built outside meta."""
    devices: list[str] = []
    for arch, builder in list(models.ARCHS.items()):
        def spy(*args, _builder=builder):
            devices.append(torch.empty(0).device.type)
            return _builder(*args)
        monkeypatch.setitem(models.ARCHS, arch, spy)
    return devices


@pytest.mark.parametrize("bad, key", [
    ({"width": -1}, "width"), ({"width": 10**10}, "width"), ({"width": True}, "width"),
    ({"widths": {"features.0.0": -1}}, "widths.features.0.0"),
    ({"widths": {"features.0.0": 10**10}}, "widths.features.0.0"),
    ({"channels": [8, 10**10]}, r"channels\[1\]"), ({"hidden": [-1]}, r"hidden\[0\]"),
    ({"in_channels": 2.5}, "in_channels"), ({"image_size": 10**10}, "image_size"), ({"num_classes": 0}, "num_classes"),
    ({"arch": "transformer"}, "arch"), ({"depth": 3}, "depth"),
    ({"hidden": [65536, 65536, 65536]}, "channels, hidden: the base cnn has"),  # 8.6G parameters
    ({"arch": "resnet", "channels": [512], "hidden": [], "image_size": 1024}, "image_size: the base resnet may hold up to"),
])
def test_a_bad_spec_is_refused_naming_the_key_before_allocating(bad, key, no_real_builds):
    with pytest.raises(ValueError, match=f"^{key}"):
        build_model({**SPECS["cnn"], **bad})
    with pytest.raises(ValueError, match=f"^{key}"):
        model_size_on_meta({**SPECS["cnn"], **bad})
    assert set(no_real_builds) <= {"meta"}


def test_widths_must_name_every_unit_within_its_full_width():
    model = tiny("cnn")
    spec = {**SPECS["cnn"], "widths": {u.name: u.size for u in units(model)}}
    with pytest.raises(ValueError, match=r"^widths.features.1.0: 17 is not in \[1, 16\]"):
        build_model({**spec, "widths": {**spec["widths"], "features.1.0": 17}})
    with pytest.raises(ValueError, match="^widths.nope: cnn has no such unit"):
        build_model({**spec, "widths": {**spec["widths"], "nope": 1}})
    with pytest.raises(ValueError, match=r"^widths: lacks units \['classifier.0.0'\]"):
        build_model({**spec, "widths": {"features.0.0": 8, "features.1.0": 16}})
    with pytest.raises(ValueError, match="^channels, hidden: resnet18 has torchvision's widths"):
        build_model({**SPECS["resnet18"], "channels": [64]})


def test_model_size_on_meta_counts_the_model_without_building_it(no_real_builds):
    spec = {**SPECS["vgg11_bn"], "width": 1.0}
    assert model_size_on_meta(spec) == 9_490_692  # 9.2M of convs, a 512-wide classifier: not torchvision's 129M
    assert model_size_on_meta({**SPECS["mobilenet_v2"], "width": 0.5}) < model_size_on_meta(SPECS["mobilenet_v2"]
                                                                                             | {"width": 1.0})
    assert set(no_real_builds) == {"meta"}

