"""Architectures built from a plain-JSON spec, and their prunable units as Torch-Pruning's dependency graph finds them."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:  # imported where used: torchvision and Torch-Pruning cost a second a stage that needs neither
    import torch_pruning as tp

Spec = dict[str, Any]
Layer = nn.Conv2d | nn.Linear


@dataclass(frozen=True, eq=False)
class Unit:
    """One group of coupled output channels (or neurons) that are removed together.

    Torch-Pruning's dependency graph says which layers share the channels: a conv and its
    BatchNorm, every producer of a residual stream, an expand conv and the depthwise conv
    after it. `layer` is the first Conv2d/Linear of the group in module order (its `name`),
    `layers` every Conv2d/Linear whose out channels are the unit's. `gates` are the parameters
    whose entry j, once zeroed, silences unit j exactly: every BatchNorm scale and shift of the
    group when it has BatchNorms, else the weight rows and biases of `layers`. `act` is the
    module whose output, through a ReLU, is the unit's activation (see `_unit`).
    """

    name: str
    layer: Layer
    gates: tuple[nn.Parameter, ...]
    act: nn.Module
    layers: tuple[Layer, ...]

    @property
    def size(self) -> int:
        return self.gates[0].shape[0]

    @property
    def min_size(self) -> int:
        """The fewest channels the unit may keep: 2 where it holds a depthwise (grouped) conv, which at
        one channel Torch-Pruning's graph takes for an ordinary conv, splitting the unit in two."""
        return 2 if any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in self.layers) else 1


# ---------------------------------------------------------------- our own architectures

class CNN(nn.Module):
    """Conv-BN-ReLU-MaxPool blocks, then fully connected ReLU layers, then a linear head."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 channels: list[int], hidden: list[int]) -> None:
        super().__init__()
        blocks, c, s = [], in_channels, image_size
        for width in channels:
            blocks.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)))
            c, s = width, s // 2
        if s < 1:
            raise ValueError(f"channels: {len(channels)} pooling blocks shrink a {image_size}-pixel image to nothing")
        self.features = nn.Sequential(*blocks)
        self.classifier, f = _mlp_layers(c * s * s, hidden)
        self.head = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.head(self.classifier(self.features(x).flatten(1)))


class MLP(nn.Module):
    """Fully connected ReLU layers over the flattened image, then a linear head."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 channels: list[int], hidden: list[int]) -> None:
        super().__init__()
        if channels:
            raise ValueError("channels: an mlp has no conv layers, channels must be []")
        self.classifier, f = _mlp_layers(in_channels * image_size * image_size, hidden)
        self.head = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.head(self.classifier(x.flatten(1)))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv-BN when projecting), then ReLU."""

    def __init__(self, c_in: int, width: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut: nn.Module = (nn.Sequential(nn.Conv2d(c_in, width, 1, stride=stride, bias=False),
                                                  nn.BatchNorm2d(width)) if project else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.relu(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual net: stem conv3x3-BN-ReLU, one BasicBlock per stage, global average pool,
    fully connected ReLU layers, then a linear head. Any image size (the pool makes it size-agnostic).

    `channels` are the stage widths; each block's conv1 is as wide as its stage. Stage 1 keeps
    the resolution and an identity shortcut; every later stage has stride 2 and a projection.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 channels: list[int], hidden: list[int]) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels: a resnet needs at least one stage width")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks, c = [], channels[0]
        for i, width in enumerate(channels):
            blocks.append(BasicBlock(c, width, stride=1 if i == 0 else 2, project=i > 0))
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier, f = _mlp_layers(c, hidden)
        self.head = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.head(self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1)))


def _mlp_layers(in_features: int, hidden: list[int]) -> tuple[nn.Sequential, int]:
    layers, f = [], in_features
    for width in hidden:
        layers.append(nn.Sequential(nn.Linear(f, width), nn.ReLU()))
        f = width
    return nn.Sequential(*layers), f


# ---------------------------------------------------------------- torchvision, adapted to small images

def _no_widths(arch: str, channels: list[int], hidden: list[int]) -> None:
    if channels or hidden:
        raise ValueError(f"channels, hidden: {arch} has torchvision's widths, both must be [] "
                         "(use width or widths to make it thinner)")


def _stem(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 stride-1 conv, initialised as torchvision initialises its convs."""
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def resnet18(in_channels: int, image_size: int, num_classes: int, channels: list[int],
             hidden: list[int]) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool (the CIFAR adaptation):
    a 32-pixel image reaches the last stage at 4x4 instead of 1x1."""
    import torchvision

    _no_widths("resnet18", channels, hidden)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _stem(in_channels, model.conv1.out_channels)
    model.maxpool = nn.Identity()
    return model


def mobilenet_v2(in_channels: int, image_size: int, num_classes: int, channels: list[int],
                 hidden: list[int]) -> nn.Module:
    """torchvision's MobileNetV2 with a 3x3 stride-1 stem (the original's is stride 2); the
    inverted residual blocks keep their strides, so a 32-pixel image ends at 2x2."""
    import torchvision

    _no_widths("mobilenet_v2", channels, hidden)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0] = _stem(in_channels, model.features[0][0].out_channels)
    return model


VGG_CLASSIFIER = 512  # the hidden width of vgg11_bn's classifier here (torchvision's: two layers of 4096)


def vgg11_bn(in_channels: int, image_size: int, num_classes: int, channels: list[int],
             hidden: list[int]) -> nn.Module:
    """torchvision's VGG-11 with BatchNorm, for small images: a max-pool that would shrink the image
    below one pixel becomes an Identity (so module names stay torchvision's), a global average pool
    replaces the 7x7 one, and the classifier is Linear(512, 512)-ReLU-Dropout(0.5)-Linear(512, classes)
    instead of 25088-4096-4096-classes (102M parameters a 1x1 feature map cannot use)."""
    import torchvision

    _no_widths("vgg11_bn", channels, hidden)
    layers: list[nn.Module] = []
    c, s = in_channels, image_size
    for v in torchvision.models.vgg.cfgs["A"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2) if s >= 2 else nn.Identity())
            s = max(s // 2, 1)
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    with torch.device("meta"):  # the original classifier is replaced below: never allocate its 102M weights
        model = torchvision.models.vgg.VGG(nn.Sequential(*layers), num_classes, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(c, VGG_CLASSIFIER), nn.ReLU(True), nn.Dropout(0.5),
                                     nn.Linear(VGG_CLASSIFIER, num_classes))
    for m in model.classifier:
        if isinstance(m, nn.Linear):  # torchvision's VGG initialisation of its linear layers
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


Builder = Callable[[int, int, int, list[int], list[int]], nn.Module]
ARCHS: dict[str, Builder] = {"cnn": CNN, "mlp": MLP, "resnet": ResNet, "resnet18": resnet18,
                             "mobilenet_v2": mobilenet_v2, "vgg11_bn": vgg11_bn}


# ---------------------------------------------------------------- units, from the dependency graph

def head(model: nn.Module) -> nn.Linear:
    """The classifier output, never pruned: the model's last nn.Linear."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]


def prunable_layers(model: nn.Module) -> dict[str, Layer]:
    """Every Conv2d and Linear but the head, by module name: what per-weight scores and masks cover."""
    out = head(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not out}


def dependency_graph(model: nn.Module) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model`, traced in eval mode (no BatchNorm statistics
    move) on a zero input of the shape build_model recorded, on the model's device. The trace follows
    autograd, so every parameter requires a gradient while it runs: a frozen layer would fall out of it."""
    import torch_pruning as tp

    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no input_shape: build it with build_model")
    p = next(model.parameters())
    modes = {m: m.training for m in model.modules()}  # restored one by one: some may be frozen in eval
    frozen = [q for q in model.parameters() if not q.requires_grad]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for q in frozen:
                q.requires_grad_(True)
            return tp.DependencyGraph().build_dependency(
                model.eval(), example_inputs=torch.zeros(1, *shape, dtype=p.dtype, device=p.device), verbose=False)
    finally:
        for m, training in modes.items():
            m.training = training
        for q in frozen:
            q.requires_grad_(False)


# A cache, not state: keyed weakly by model, so nothing is kept alive, and nothing is stored on the
# model that deepcopy, MLflow or ONNX export would carry. Entries are checked against the identity and
# shape of every parameter, which pruning (and masking's weight_orig) change.
_UNITS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[Unit]]] = weakref.WeakKeyDictionary()


def units(model: nn.Module) -> list[Unit]:
    """One Unit per prunable group of `model` (the head's excluded), in module order of their `layer`."""
    key = tuple((n, id(p), tuple(p.shape)) for n, p in model.named_parameters())
    cached = _UNITS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _find_units(model))
        _UNITS[model] = cached
    return list(cached[1])


def _find_units(model: nn.Module) -> list[Unit]:
    graph = dependency_graph(model)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    groups = graph.get_all_groups(ignored_layers=[head(model)], root_module_types=[nn.Conv2d, nn.Linear])
    found = [_unit(group, graph, names, order) for group in groups]
    return sorted(found, key=lambda u: order[u.name])


def _unit(group: tp.Group, graph: tp.DependencyGraph, names: dict[nn.Module, str],
          order: dict[str, int]) -> Unit:
    """A Unit from one full-width group: the model's modules whose out channels the group removes.

    `act` is the group's first BatchNorm in module order (else its `layer`): where a unit is one
    conv-BN-ReLU or Linear-ReLU, ReLU of it is exactly the unit's activation (mobilenet_v2's ReLU6
    also clips at 6; its linear bottlenecks have no activation, so ReLU of them is a proxy). A
    residual stream is a sum that is no module's output: its first BatchNorm is the stem's at the
    first stage (ReLU of it is exactly the stream where it starts) and, at later stages, that of
    the first block's residual branch (conv2's BatchNorm), a proxy for the stream.
    """
    members = sorted(_out_channel_modules(group, graph, names), key=lambda m: order[names[m]])
    layers = tuple(m for m in members if isinstance(m, (nn.Conv2d, nn.Linear)))
    norms = [m for m in members if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    others = [names[m] for m in members if m not in layers and m not in norms]
    if others or any(bn.weight is None for bn in norms):
        raise NotImplementedError(f"unit of {names[layers[0]]}: {others or 'a BatchNorm without affine'} "
                                  "cannot be gated; only Conv2d, Linear and affine BatchNorm are")
    gates = (tuple(p for bn in norms for p in (bn.weight, bn.bias)) if norms
             else tuple(p for m in layers for p in (m.weight, m.bias) if p is not None))
    return Unit(names[layers[0]], layers[0], gates, norms[0] if norms else layers[0], layers)


def _out_channel_modules(group: tp.Group, graph: tp.DependencyGraph, names: dict[nn.Module, str]) -> list[nn.Module]:
    """The model's modules whose out channels `group` prunes, each channel j of them being unit j."""
    out = []
    for item in group:
        module = item.dep.target.module
        if module in names and graph.is_out_channel_pruning_fn(item.dep.handler):
            if list(item.idxs) != list(item.root_idxs):  # a concat or split would shuffle channels
                raise NotImplementedError(f"{names[module]}: its channels are not the unit's one to one")
            out.append(module)
    return out


def remove_units(model: nn.Module, remove: Mapping[str, Sequence[int] | torch.Tensor]) -> nn.Module:
    """Physically remove units (and every coupled channel: BatchNorm, residual adds, depthwise convs,
    the next layers' inputs, flattened features) with Torch-Pruning's dependency graph.
    `remove` maps unit names to the indices to remove. Returns the same model, smaller."""
    found = units(model)
    unknown = sorted(set(remove) - {u.name for u in found})
    if unknown:
        raise ValueError(f"no units named {unknown}")
    chosen = {u.name: sorted({int(i) for i in remove.get(u.name, [])}) for u in found}
    for u in found:  # every unit checked before any is pruned
        idxs = chosen[u.name]
        if outside := [i for i in idxs if not 0 <= i < u.size]:
            raise ValueError(f"{u.name}: index {outside[0]} is out of range for its {u.size} units")
        if u.size - len(idxs) < u.min_size:
            raise ValueError(f"{u.name}: cannot remove {len(idxs)} of its {u.size} units; "
                             f"it keeps at least {u.min_size}")
    graph = dependency_graph(model)
    for u in found:
        if chosen[u.name]:
            graph.get_pruning_group(u.layer, graph.get_pruner_of_module(u.layer).prune_out_channels,
                                    chosen[u.name]).prune()
    return model


# ---------------------------------------------------------------- specs

REQUIRED_KEYS = ("arch", "in_channels", "image_size", "num_classes", "channels", "hidden")
SPEC_KEYS = (*REQUIRED_KEYS, "width", "widths")
BOUNDS = {"in_channels": (1, 64), "image_size": (1, 1024), "num_classes": (1, 100_000)}
MAX_WIDTH, MAX_LAYERS = 1 << 16, 64  # any one width (channels, hidden, widths); entries of channels, hidden
# The base model (full width) may have at most MAX_PARAMS parameters (400 MB of float32, 1.6 GB with
# gradients and Adam's moments; vgg11_bn here has 9.5M, resnet18 11.2M) and at most MAX_ACTIVATIONS
# elements in its layers' outputs for one sample (the trace of the dependency graph keeps them all), by an
# upper bound: every conv output at the full image size (resnet18 at 32 px: 5M; at 224 px: 240M). Both
# are counted on the meta device before anything is allocated.
MAX_PARAMS = 10**8
MAX_ACTIVATIONS = 10**9


def check_spec(spec: Any) -> None:
    """Refuse a spec that is not plain data of the right kinds in sane bounds; the message names the key."""
    if not isinstance(spec, dict):
        raise ValueError(f"a spec is a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown spec key; known: {list(SPEC_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise ValueError(f"spec lacks {missing}")
    if spec["arch"] not in ARCHS:
        raise ValueError(f"arch: unknown architecture {spec['arch']!r}; known: {sorted(ARCHS)}")
    for key, (lo, hi) in BOUNDS.items():
        _check_int(key, spec[key], lo, hi)
    for key in ("channels", "hidden"):
        if not isinstance(spec[key], list) or len(spec[key]) > MAX_LAYERS:
            raise ValueError(f"{key}: a list of at most {MAX_LAYERS} widths, got {spec[key]!r}")
        for i, w in enumerate(spec[key]):
            _check_int(f"{key}[{i}]", w, 1, MAX_WIDTH)
    width = spec.get("width", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise ValueError(f"width: a number in (0, 1], got {width!r}")
    widths = spec.get("widths", {})
    if not isinstance(widths, dict) or len(widths) > 100_000:
        raise ValueError(f"widths: an object of unit name -> width, got {type(widths).__name__}")
    for name, w in widths.items():
        _check_int(f"widths.{name}", w, 1, MAX_WIDTH)


def _check_int(key: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{key}: an integer in [{lo}, {hi}], got {value!r}")


def _base(spec: Spec) -> nn.Module:
    """The spec's architecture at full width, with its input shape recorded (a plain attribute, not state)."""
    model = ARCHS[spec["arch"]](spec["in_channels"], spec["image_size"], spec["num_classes"],
                                list(spec["channels"]), list(spec["hidden"]))
    model.input_shape = (spec["in_channels"], spec["image_size"], spec["image_size"])
    return model


def _check_cost(spec: Spec) -> None:
    """Build the base model on the meta device (nothing allocated) and refuse it if it has too many
    parameters, or too many activations by an upper bound read off its layers (every conv output at
    the full image size), which needs no forward pass: a meta forward costs seconds of imports."""
    with torch.device("meta"):
        model = _base(spec)
    if count_params(model) > MAX_PARAMS:
        raise ValueError(f"channels, hidden: the base {spec['arch']} has {count_params(model):,} parameters, "
                         f"more than the {MAX_PARAMS:,} allowed")
    pixels = spec["image_size"] ** 2
    bound = sum(m.out_channels * pixels if isinstance(m, nn.Conv2d) else m.out_features
                for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    if bound > MAX_ACTIVATIONS:
        raise ValueError(f"image_size: the base {spec['arch']} may hold up to {bound:,} activations per sample "
                         f"at {spec['image_size']} pixels, more than the {MAX_ACTIVATIONS:,} allowed")


def target_widths(model: nn.Module, spec: Spec) -> dict[str, int]:
    """Per unit of the full-width `model`, the width the spec asks for: its `widths`, each checked
    against the unit, or else max(1, round(size * width)) (2 for a unit with a depthwise conv)."""
    found = {u.name: u for u in units(model)}
    if "widths" not in spec:
        return {n: max(u.min_size, round(u.size * spec.get("width", 1.0))) for n, u in found.items()}
    widths = spec["widths"]
    for name, w in widths.items():
        if name not in found:
            raise ValueError(f"widths.{name}: {spec['arch']} has no such unit; its units are {list(found)}")
        if not found[name].min_size <= w <= found[name].size:
            raise ValueError(f"widths.{name}: {w} is not in [{found[name].min_size}, {found[name].size}], "
                             "the unit's least and full widths")
    missing = [n for n in found if n not in widths]
    if missing:
        raise ValueError(f"widths: lacks units {missing}")
    return dict(widths)


def _shrink(model: nn.Module, spec: Spec) -> nn.Module:
    """Cut every unit to its target width by removing its trailing channels (weights are loaded later).
    A full-width spec needs no cut, and no dependency graph."""
    if "widths" not in spec and spec.get("width", 1.0) == 1.0:
        return model
    sizes = {u.name: u.size for u in units(model)}
    return remove_units(model, {n: range(w, sizes[n]) for n, w in target_widths(model, spec).items()})


def build_model(spec: Spec) -> nn.Module:
    """The model a spec describes: checked, counted on the meta device, built at full width, then each
    unit cut to its width, so a pruned model rebuilds exactly from its builder, arguments and widths."""
    check_spec(spec)
    _check_cost(spec)
    return _shrink(_base(spec), spec)


def model_size_on_meta(spec: Spec) -> int:
    """Parameters of the model a spec describes (widths and width multiplier applied), counted on the
    meta device: nothing is allocated. Raises ValueError for a spec build_model would refuse."""
    check_spec(spec)
    _check_cost(spec)
    with torch.device("meta"):
        model = _base(spec)
    return count_params(_shrink(model, spec))  # the graph is traced on meta tensors too


def spec_of(model: nn.Module, spec: Spec) -> Spec:
    """The spec of `model` as it is now: `spec` with the width of every unit read from the model; a
    model still at its base widths (every parameter shaped as the spec's base, counted on the meta
    device) keeps a spec without `widths`, and no dependency graph is traced for it."""
    base = {k: v for k, v in spec.items() if k != "widths"}
    if base.get("width", 1.0) == 1.0:
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in _base(base).state_dict().items()}
        if shapes == {n: tuple(p.shape) for n, p in model.state_dict().items()}:
            return {**base, "width": 1.0}
    return {**base, "width": spec.get("width", 1.0), "widths": {u.name: u.size for u in units(model)}}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
