"""Architectures built from a JSON-able spec, and the prunable units each one exposes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

Spec = dict[str, Any]


@dataclass(frozen=True)
class Unit:
    """One prunable layer: its output units (neurons or channels) can be removed.

    `gates` are the parameters whose entry j, once zeroed, silences unit j exactly
    (the BatchNorm scale and shift when the layer has one, else the layer's own
    weight rows and bias); `act` is the module whose output is the unit's activation.
    """

    name: str
    layer: nn.Conv2d | nn.Linear
    gates: tuple[nn.Parameter, ...]
    act: nn.Module

    @property
    def size(self) -> int:
        return self.gates[0].shape[0]


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
        self.features = nn.Sequential(*blocks)
        self.classifier, f = _mlp_layers(c * s * s, hidden)
        self.head = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.head(self.classifier(self.features(x).flatten(1)))

    def units(self) -> list[Unit]:
        convs = [Unit(f"features.{i}.0", b[0], (b[1].weight, b[1].bias), b[2])
                 for i, b in enumerate(self.features)]
        return convs + _linear_units(self.classifier, "classifier")


class MLP(nn.Module):
    """Fully connected ReLU layers over the flattened image, then a linear head."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 channels: list[int], hidden: list[int]) -> None:
        super().__init__()
        if channels:
            raise ValueError("an mlp has no conv layers: channels must be []")
        self.classifier, f = _mlp_layers(in_channels * image_size * image_size, hidden)
        self.head = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.head(self.classifier(x.flatten(1)))

    def units(self) -> list[Unit]:
        return _linear_units(self.classifier, "classifier")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv-BN when projecting), then ReLU."""

    def __init__(self, c_in: int, mid: int, out: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut: nn.Module = (nn.Sequential(nn.Conv2d(c_in, out, 1, stride=stride, bias=False),
                                                  nn.BatchNorm2d(out)) if project else nn.Identity())
        # its own module, not F.relu: a unit's activation is read by a forward hook on it
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.relu(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual net: stem conv3x3-BN-ReLU, one BasicBlock per stage, global average pool,
    fully connected ReLU layers, then a linear head. Any image size (the pool makes it size-agnostic).

    `channels` = [s1, m1, s2, m2, ...], two widths per stage, in the order of `units()`:
    s_i is the width of stage i's residual stream (the stem conv, block i's conv2 and, from
    stage 2 on, its 1x1 projection shortcut all share it), m_i the width of block i's conv1.
    Stage 1 keeps the resolution and an identity shortcut; every later stage has stride 2 and a
    projection shortcut, whatever the widths, so a pruned model rebuilds from its widths alone.
    params.yaml gives only the stage widths [s1, s2, ...]; `spec_channels` expands them.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 channels: list[int], hidden: list[int]) -> None:
        super().__init__()
        if not channels or len(channels) % 2:
            raise ValueError(f"a resnet's channels are [stream, conv1] width pairs per stage, got {channels}")
        streams, mids = channels[0::2], channels[1::2]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, streams[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(streams[0]), nn.ReLU())
        blocks, c = [], streams[0]
        for i, (s, m) in enumerate(zip(streams, mids)):
            blocks.append(BasicBlock(c, m, s, stride=1 if i == 0 else 2, project=i > 0))
            c = s
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier, f = _mlp_layers(c, hidden)
        self.head = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.head(self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1)))

    def units(self) -> list[Unit]:
        """Per stage: its residual stream (one coupled unit), then its block's conv1 channels."""
        out = []
        for i, b in enumerate(self.blocks):
            # The stream is made by the stem conv (stage 1) or the projection (later stages), and
            # by conv2: channel j is exactly 0 after the add and ReLU only when both BNs are zeroed.
            name, conv, bn = (("stem.0", self.stem[0], self.stem[1]) if i == 0
                              else (f"blocks.{i}.shortcut.0", b.shortcut[0], b.shortcut[1]))
            out.append(Unit(name, conv, (bn.weight, bn.bias, b.bn2.weight, b.bn2.bias), b.relu))
            out.append(Unit(f"blocks.{i}.conv1", b.conv1, (b.bn1.weight, b.bn1.bias), b.relu1))
        return out + _linear_units(self.classifier, "classifier")


def _mlp_layers(in_features: int, hidden: list[int]) -> tuple[nn.Sequential, int]:
    layers, f = [], in_features
    for width in hidden:
        layers.append(nn.Sequential(nn.Linear(f, width), nn.ReLU()))
        f = width
    return nn.Sequential(*layers), f


def _linear_units(seq: nn.Sequential, prefix: str) -> list[Unit]:
    return [Unit(f"{prefix}.{i}.0", b[0], (b[0].weight, b[0].bias), b[1]) for i, b in enumerate(seq)]


ARCHS: dict[str, Callable[..., nn.Module]] = {"cnn": CNN, "mlp": MLP, "resnet": ResNet}
SPEC_KEYS = ("arch", "in_channels", "image_size", "num_classes", "channels", "hidden")


def build_model(spec: Spec) -> nn.Module:
    """Build the model a spec describes; widths in the spec are exact, so pruned models rebuild too."""
    if spec.get("arch") not in ARCHS:
        raise ValueError(f"unknown architecture {spec.get('arch')!r}; known: {sorted(ARCHS)}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"spec lacks {missing}")
    kwargs = {k: spec[k] for k in SPEC_KEYS if k != "arch"}
    return ARCHS[spec["arch"]](**kwargs)


def spec_channels(arch: str, widths: list[int]) -> list[int]:
    """The spec's `channels` for the widths params.yaml gives: a resnet's stage widths [s1, s2, ...]
    become [s1, s1, s2, s2, ...] (each block's conv1 as wide as its stage); other archs as given."""
    return [w for s in widths for w in (s, s)] if arch == "resnet" else list(widths)


def spec_of(model: nn.Module, spec: Spec) -> Spec:
    """The spec of `model` as it is now: `spec` with every layer width read from the modules."""
    units = model.units()
    # conv units come first in every arch's units(), in the order its `channels` lists them
    n_conv = sum(isinstance(u.layer, nn.Conv2d) for u in units)
    widths = [u.size for u in units]
    return {**spec, "channels": widths[:n_conv], "hidden": widths[n_conv:]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
