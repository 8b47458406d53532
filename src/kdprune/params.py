"""params.yaml loaded into frozen dataclasses; every bad key or value fails naming the key."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdprune.errors import ParamsError


def _range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open, hi_open)}


def _between(default: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Any:
    return field(default=default, metadata=_range(lo, hi, lo_open, hi_open))


def _positive(default: float) -> Any:
    return field(default=default, metadata=_range(0, float("inf"), lo_open=True))


def _widths(*default: int) -> Any:
    return field(default_factory=lambda: list(default), metadata={"each": (1, 1 << 16, False, False)})


Arch = Literal["cnn", "mlp", "resnet"]
Optimizer = Literal["adam", "sgd"]
Criterion = Literal["l1", "l2", "taylor", "hessian", "fisher", "activation", "apoz", "random"]
CRITERIA: tuple[str, ...] = typing.get_args(Criterion)
IMAGE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}  # each conv stage halves it


@dataclass(frozen=True)
class DataParams:
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10"] = "digits"
    val_fraction: float = _between(0.15, 0.0, 0.5, lo_open=True)
    test_fraction: float = _between(0.2, 0.0, 0.5, lo_open=True)  # digits only: torchvision sets keep their own test split
    download: bool = True


@dataclass(frozen=True)
class TrainParams:
    """A network to train: its architecture and its optimiser."""
    arch: Arch = "cnn"
    channels: list[int] = _widths(32, 64)
    hidden: list[int] = _widths(128)
    epochs: int = _between(20, 1, 10_000)
    batch_size: int = _between(64, 1, 1 << 20)
    optimizer: Optimizer = "adam"
    lr: float = _between(0.002, 0.0, 10.0, lo_open=True)
    weight_decay: float = _between(0.0, 0.0, 1.0)


@dataclass(frozen=True)
class StudentParams(TrainParams):
    """The student (distilled, and from scratch as the control)."""
    label_fraction: float = _between(1.0, 0.0, 1.0, lo_open=True)  # of the train split whose hard labels it sees
    l1: float = _between(0.0, 0.0, 1.0)  # L1 penalty on BatchNorm scales (network slimming), else on weights


@dataclass(frozen=True)
class DistillParams:
    temperature: float = _between(4.0, 0.0, 100.0, lo_open=True)
    alpha: float = _between(0.9, 0.0, 1.0)


@dataclass(frozen=True)
class ScoreParams:
    methods: list[Criterion] = field(default_factory=lambda: list(CRITERIA))
    samples: int = _between(512, 1, 1 << 24)  # train samples seen by the data-driven criteria
    batch_size: int = _between(128, 1, 1 << 20)
    probes: int = _between(32, 1, 100_000)  # Hutchinson probes for the Hessian diagonal
    oracle: bool = True  # also measure the true loss change of removing each unit alone
    oracle_split: Literal["train", "val"] = "train"  # the split that loss change is measured on


@dataclass(frozen=True)
class PruneParams:
    criterion: Criterion = "taylor"
    amount: float = _between(0.5, 0.0, 1.0, hi_open=True)
    structured: bool = True
    scope: Literal["global", "layer", "sensitivity"] = "global"
    steps: int = _between(1, 1, 100)  # rounds to reach the amount in, re-scoring and recovering between them
    round_epochs: int = _between(2, 0, 1000)  # recovery fine-tune between rounds (hard labels, Adam)
    round_lr: float = _between(0.001, 0.0, 10.0, lo_open=True)


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = _between(10, 0, 10_000)
    batch_size: int = _between(64, 1, 1 << 20)
    optimizer: Optimizer = "adam"
    lr: float = _between(0.001, 0.0, 10.0, lo_open=True)
    weight_decay: float = _between(0.0, 0.0, 1.0)
    distill: bool = True  # distil from the teacher's logits (distill.temperature, distill.alpha)


@dataclass(frozen=True)
class EvaluateParams:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 256], metadata={"each": (1, 1 << 16, False, False)})
    threads: int = _between(1, 1, 1024)
    warmup: int = _between(5, 0, 10_000)
    repeats: int = _between(30, 1, 100_000)
    registered_model: str = "auto"  # MLflow registry name for the fine-tuned model; auto: kdprune-<data.name>
    max_accuracy_drop: float = _between(0.01, 0.0, 1.0)  # register only within this drop against the student


@dataclass(frozen=True)
class Params:
    seed: int = _between(0, 0, 2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = field(default_factory=DataParams)
    teacher: TrainParams = field(default_factory=lambda: TrainParams(channels=[64, 128], hidden=[256]))
    student: StudentParams = field(default_factory=StudentParams)
    distill: DistillParams = field(default_factory=DistillParams)
    score: ScoreParams = field(default_factory=ScoreParams)
    prune: PruneParams = field(default_factory=PruneParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole of params.yaml; raise ParamsError listing every problem."""
    path = Path(path)
    try:
        with path.open() as f:
            raw = yaml.safe_load(f)  # plain data only: no tag can construct an object
    except (OSError, yaml.YAMLError) as e:
        raise ParamsError(f"{path}: cannot read: {e}".splitlines()[0]) from e
    errors: list[str] = []
    params = _build(Params, raw if raw is not None else {}, "", errors)
    if not errors:
        errors += _cross_checks(params)
    if errors:
        raise ParamsError("\n".join(f"{path}: {e}" for e in errors))
    return params


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or '<top>'}: must be a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors += [f"{prefix}{k}: unknown key (allowed: {', '.join(fields)})" for k in raw if k not in fields]
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key + ".", errors)
        else:
            values[name] = _check(key, raw[name], hint, dict(f.metadata), errors)
    try:
        return cls(**values)
    except TypeError:  # a nested section already failed
        return None


def _check(key: str, value: Any, hint: Any, meta: dict[str, Any], errors: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or not all(_fits(v, item) for v in value):
            errors.append(f"{key}: must be a list of {_describe(item)}, got {value!r}")
        elif "each" in meta:
            for v in value:
                _check_range(key, v, meta["each"], errors)
        return value
    if not _fits(value, hint):
        errors.append(f"{key}: must be {_describe(hint)}, got {value!r}")
        return value
    if "range" in meta:
        _check_range(key, value, meta["range"], errors)
    return value


def _fits(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


def _check_range(key: str, value: float, bounds: tuple, errors: list[str]) -> None:
    lo, hi, lo_open, hi_open = bounds
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        errors.append(f"{key}: must be in {interval}, got {value!r}")


def _cross_checks(p: Params) -> list[str]:
    errors = []
    for name in ("teacher", "student"):
        t: TrainParams = getattr(p, name)
        if t.arch == "mlp" and t.channels:
            errors.append(f"{name}.channels: an mlp has no conv layers, must be [], got {t.channels!r}")
        if t.arch == "cnn" and not t.channels:
            errors.append(f"{name}.channels: a cnn needs at least one conv layer")
        if t.arch == "resnet" and not t.channels:  # resnet channels are stage widths, one block each
            errors.append(f"{name}.channels: a resnet needs at least one stage width")
    for key in ("channels", "hidden"):
        s, t = getattr(p.student, key), getattr(p.teacher, key)
        if p.student.arch == p.teacher.arch and any(a > b for a, b in zip(s, t)):
            errors.append(f"student.{key}: the student is wider than its teacher ({s} vs teacher.{key} {t})")
    for name in ("teacher", "student"):
        t = getattr(p, name)
        size, depth = IMAGE_SIZE[p.data.name], len(t.channels)
        if t.arch in ("cnn", "resnet") and depth and size >> (depth - (t.arch == "resnet")) < 1:
            errors.append(f"{name}.channels: {depth} downsampling stages shrink {p.data.name}'s {size}x{size} "
                          f"images below one pixel")
    if p.student.arch == "mlp" and not p.student.hidden:
        errors.append("student.hidden: an mlp student needs a hidden layer: there is nothing else to prune")
    if not p.evaluate.registered_model.strip():
        errors.append("evaluate.registered_model: must name a registered model, or be auto")
    if not {1, 256} <= set(p.evaluate.batch_sizes):
        errors.append(f"evaluate.batch_sizes: must include 1 and 256 (the headline latencies), "
                      f"got {p.evaluate.batch_sizes}")
    if p.prune.scope == "sensitivity" and not p.prune.structured:
        errors.append("prune.scope: sensitivity spreads units across layers; it needs prune.structured: true")
    if not p.score.methods:
        errors.append("score.methods: list at least one criterion")
    if p.prune.criterion not in p.score.methods:
        errors.append(f"prune.criterion: {p.prune.criterion!r} is not among score.methods {p.score.methods}")
    return errors


def flatten(section: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) params dataclass as {"prune.amount": 0.5, ...}, for MLflow."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out
