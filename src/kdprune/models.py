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


def _mlp_layers(in_features: int, hidden: list[int]) -> tuple[nn.Sequential, int]:
    layers, f = [], in_features
    for width in hidden:
        layers.append(nn.Sequential(nn.Linear(f, width), nn.ReLU()))
        f = width
    return nn.Sequential(*layers), f


def _linear_units(seq: nn.Sequential, prefix: str) -> list[Unit]:
    return [Unit(f"{prefix}.{i}.0", b[0], (b[0].weight, b[0].bias), b[1]) for i, b in enumerate(seq)]


ARCHS: dict[str, Callable[..., nn.Module]] = {"cnn": CNN, "mlp": MLP}
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


def spec_of(model: nn.Module, spec: Spec) -> Spec:
    """The spec of `model` as it is now: `spec` with every layer width read from the modules."""
    widths = [u.size for u in model.units()]
    n_conv = len(spec["channels"])
    return {**spec, "channels": widths[:n_conv], "hidden": widths[n_conv:]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
