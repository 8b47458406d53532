"""params.yaml loaded into frozen dataclasses; every missing key, bad key or bad value fails naming the key.

params.yaml is the only source of values: no field has a default here, so deleting a key is an
error, never a silent change of the experiment. (With DVC's Hydra composition, `dvc exp run`
writes params.yaml from conf/; `tests/test_params.py` keeps the committed file equal to that.)
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdprune.errors import ParamsError

Arch = Literal["cnn", "mlp", "resnet", "resnet18", "mobilenet_v2", "vgg11_bn"]
OWN_ARCHS = ("cnn", "mlp", "resnet")  # ours, shaped by `channels` and `hidden`; the rest are torchvision's
Optimizer = Literal["adam", "sgd"]
Criterion = Literal["l1", "l2", "taylor", "hessian", "fisher", "activation", "apoz", "random"]
CRITERIA: tuple[str, ...] = typing.get_args(Criterion)
Dataset = Literal["digits", "mnist", "fashion_mnist", "cifar10"]
# (channels, height = width, classes) of each dataset: what a model is built for before any data exists
SHAPES: dict[str, tuple[int, int, int]] = {"digits": (1, 8, 10), "mnist": (1, 28, 10),
                                           "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10)}
# samples that data.test_fraction (digits only) and data.val_fraction split: all of digits, the torchvision
# sets' own train split
SAMPLES: dict[str, int] = {"digits": 1797, "mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}
WEIGHTS_DIR = "weights"  # a user's own teacher state_dict lives here: train_teacher depends on the folder
_BAD = object()  # a value that failed its check (None is a legitimate value: teacher.weights)
_REGISTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,255}")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no tag can construct an object) with two changes: `1e-3` is a
    number, as DVC's reader, Hydra and `dvc exp run -S` take it (PyYAML's YAML 1.1 wants `1.0e-3`, and
    `lr: 1e-3` was refused as text), and a key given twice is an error (the last one had won, unsaid, in a
    stage run by hand; `dvc repro` refuses such a file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):  # (unhashable: `key in seen` would be a TypeError's traceback)
                kind = "list" if isinstance(key, list) else "mapping"
                raise yaml.constructor.ConstructorError(None, None, f"a key that is a {kind}, not a name",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(  # YAML 1.2's floats that 1.1 reads as text
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, unique: bool = False) -> Any:
    """A required field whose value (or each item, for a list) must lie in the interval."""
    return field(metadata={"range": (lo, hi, lo_open, hi_open), "unique": unique})


@dataclass(frozen=True)
class DataParams:
    name: Dataset
    val_fraction: float = _in(0.0, 0.5, lo_open=True)
    test_fraction: float = _in(0.0, 0.5, lo_open=True)  # digits only: torchvision sets keep their own
    download: bool


@dataclass(frozen=True)
class AugmentParams:
    """Training-time augmentation of the train split (never of val or test)."""
    crop: int = _in(0, 64)  # random crop after zero padding by this many pixels; 0: none
    flip: bool  # random horizontal flip


@dataclass(frozen=True)
class FitParams:
    """How a network is fitted: the one optimiser type of teacher, students, fine-tuning and prune rounds."""
    epochs: int = _in(0, 10_000)
    batch_size: int = _in(2, 1 << 16)  # BatchNorm cannot train on a batch of one
    optimizer: Optimizer  # adam, or sgd (momentum 0.9, Nesterov); cosine-annealed learning rate
    lr: float = _in(0.0, 10.0, lo_open=True)
    weight_decay: float = _in(0.0, 1.0)


@dataclass(frozen=True)
class NetParams(FitParams):
    """A network to build and train."""
    arch: Arch
    channels: list[int] = _in(1, 1 << 12)  # conv widths (cnn), stage widths (resnet); [] for mlp and torchvision
    hidden: list[int] = _in(1, 1 << 14)  # fully connected widths before the head (cnn, mlp, resnet)
    width: float = _in(0.0, 1.0, lo_open=True)  # width multiplier: each unit keeps round(width * units)

    def spec(self, in_channels: int, image_size: int, num_classes: int) -> dict[str, Any]:
        """The architecture spec (models.build_model) of this network for data of this shape."""
        return {"arch": self.arch, "in_channels": in_channels, "image_size": image_size,
                "num_classes": num_classes, "channels": list(self.channels), "hidden": list(self.hidden),
                "width": self.width}


@dataclass(frozen=True)
class TeacherParams(NetParams):
    weights: str | None  # a state_dict file under weights/ for the arch: used instead of training


@dataclass(frozen=True)
class StudentParams(NetParams):
    label_fraction: float = _in(0.0, 1.0, lo_open=True)  # of the train split whose hard labels it sees
    l1: float = _in(0.0, 1.0)  # L1 penalty on BatchNorm scales (network slimming), else on weights


@dataclass(frozen=True)
class DistillParams:
    temperature: float = _in(0.0, 100.0, lo_open=True)
    alpha: float = _in(0.0, 1.0)


@dataclass(frozen=True)
class ScoreParams:
    methods: list[Criterion] = field(metadata={"unique": True})
    samples: int = _in(1, 1 << 24)  # train samples the data-driven criteria see
    batch_size: int = _in(1, 1 << 16)
    probes: int = _in(1, 100_000)  # Hutchinson probes (hessian)
    oracle: bool  # also measure the true loss change of removing each unit alone
    oracle_samples: int = _in(1, 1 << 24)  # ...on this many samples of oracle_split
    oracle_split: Literal["train", "val"]


@dataclass(frozen=True)
class PruneParams:
    criterion: Criterion
    amount: float = _in(0.0, 1.0, hi_open=True)
    structured: bool
    scope: Literal["global", "layer", "sensitivity"]
    steps: int = _in(1, 100)  # rounds to reach the amount in, re-scoring and recovering between them
    round_to: int = _in(1, 1024)  # structured: every pruned width a multiple of this, never below it
    curves: bool  # measure per-layer sensitivity curves even when scope is not sensitivity
    recover: FitParams  # the fit between iterative rounds (hard labels)


@dataclass(frozen=True)
class FinetuneParams(FitParams):
    distill: bool  # distil from the teacher's logits (distill.temperature, distill.alpha)


@dataclass(frozen=True)
class EvaluateParams:
    batch_sizes: list[int] = _in(1, 1 << 16, unique=True)
    threads: int = _in(1, 1024)  # latency is measured at this intra-op thread count
    warmup: int = _in(0, 10_000)
    rounds: int = _in(3, 100_000)  # interleaved timing rounds: medians and spreads come from these
    device: Literal["cpu", "cuda"]  # where latency is measured
    registered_model: str  # MLflow registry name of the fine-tuned model; auto: kdprune-<data.name>
    max_accuracy_drop: float = _in(0.0, 1.0)  # register only within this drop against the student


@dataclass(frozen=True)
class Params:
    preset: str  # the conf/preset/*.yaml this file was composed from (a label; nothing reads it)
    seed: int = _in(0, 2**32 - 1)
    device: Literal["auto", "cpu", "cuda"]
    threads: int = _in(1, 1024)  # torch intra-op threads of every stage: the same params give the same bytes
    data: DataParams
    augment: AugmentParams
    teacher: TeacherParams
    student: StudentParams
    distill: DistillParams
    score: ScoreParams
    prune: PruneParams
    finetune: FinetuneParams
    evaluate: EvaluateParams


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole of params.yaml; raise ParamsError listing every problem, one per line."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # bytes: a file that is not UTF-8 is a YAMLError naming the byte
            loader = _Loader(f)
            try:
                raw = loader.get_single_data()
            finally:
                loader.dispose()
    except yaml.reader.ReaderError as e:
        raise ParamsError(f"{path}: cannot read: not UTF-8 text (byte {e.position}: {e.reason})") from e
    except (OSError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ParamsError(f"{path}: cannot read: {str(e).splitlines()[0]}{where}") from e
    errors: list[str] = []
    params = _build(Params, {} if raw is None else raw, "", errors)
    if not errors:
        errors += cross_checks(params)
    if errors:
        raise ParamsError("\n".join(f"{path}: {e}" for e in errors))
    return params


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or '<top>'}: must be a mapping, got {raw!r}")
        return _BAD
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors += [f"{prefix}{k}: unknown key (allowed: {', '.join(fields)})" for k in raw if k not in fields]
    errors += [f"{prefix}{k}: missing" for k in fields if k not in raw]
    values = {}
    for name, f in fields.items():
        key, hint = prefix + name, hints[name]
        if name not in raw:
            continue
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key + ".", errors)
        else:
            values[name] = _check(key, raw[name], hint, dict(f.metadata), errors)
    if len(values) < len(fields) or any(v is _BAD for v in values.values()):
        return _BAD
    return cls(**values)


def _check(key: str, value: Any, hint: Any, meta: dict[str, Any], errors: list[str]) -> Any:
    bounds = meta.get("range")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or not all(_fits(v, item) for v in value):
            errors.append(f"{key}: must be a list of {_describe(item)}, got {value!r}")
            return _BAD
        if meta.get("unique") and len(set(map(str, value))) != len(value):
            errors.append(f"{key}: lists {value!r} with a duplicate")
        for i, v in enumerate(value if bounds else ()):
            _check_range(f"{key}[{i}]", v, bounds, errors)
        return [_declared(v, item) for v in value]
    if not _fits(value, hint):
        errors.append(f"{key}: must be {_describe(hint)}, got {value!r}")
        return _BAD
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{key}: must be a finite number, got {value!r}")
    elif bounds:
        _check_range(key, value, bounds, errors)
    return _declared(value, hint)


def _declared(value: Any, hint: Any) -> Any:
    """A whole number given for a decimal as the decimal (`-S student.width=1` writes `width: 1`): the same
    setting, logged the same ("1.0"), as the default's."""
    decimal = hint is float or (type(None) in typing.get_args(hint) and float in typing.get_args(hint))
    return float(value) if decimal and isinstance(value, int) and not isinstance(value, bool) else value


def _fits(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if type(None) in args:  # X | None
        return value is None or any(_fits(value, a) for a in args if a is not type(None))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, args))
    if type(None) in args:
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


def _check_range(key: str, value: float, bounds: tuple, errors: list[str]) -> None:
    lo, hi, lo_open, hi_open = bounds
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        errors.append(f"{key}: must be in {interval}, got {value!r}")


def cross_checks(p: Params) -> list[str]:
    """What no single value shows: shapes that fit the data, choices that agree with each other."""
    errors = [e for name in ("teacher", "student") for e in _arch_checks(name, getattr(p, name), p.data.name)]
    if p.student.arch == "mlp" and not p.student.hidden:
        errors.append("student.hidden: an mlp student needs a hidden layer: there is nothing else to prune")
    if p.teacher.weights is not None and not _under_weights_dir(p.teacher.weights):
        errors.append(f"teacher.weights: must be a file under {WEIGHTS_DIR}/ (train_teacher depends on that "
                      f"folder), got {p.teacher.weights!r}")
    if not p.evaluate.registered_model.strip():
        errors.append("evaluate.registered_model: must name a registered model, or be auto")
    elif p.evaluate.registered_model != "auto" and not _REGISTRY_NAME.fullmatch(p.evaluate.registered_model):
        errors.append(f"evaluate.registered_model: {p.evaluate.registered_model!r} is not a registry name "
                      "(letters, digits, '.', '_' and '-', at most 256, starting with a letter or digit)")
    if not {1, 256} <= set(p.evaluate.batch_sizes):
        errors.append(f"evaluate.batch_sizes: must include 1 and 256 (the headline latencies), "
                      f"got {p.evaluate.batch_sizes}")
    if p.prune.scope == "sensitivity" and not p.prune.structured:
        errors.append("prune.scope: sensitivity spreads units across layers; it needs prune.structured: true")
    if not p.score.methods:
        errors.append("score.methods: list at least one criterion")
    if p.prune.criterion not in p.score.methods:
        errors.append(f"prune.criterion: {p.prune.criterion!r} is not among score.methods {p.score.methods}")
    return errors + _split_checks(p.data)


def _split_checks(data: DataParams) -> list[str]:
    """A stratified split holds out ceil(fraction * samples) rows (scikit-learn's count) and needs one of
    each class among them: a smaller fraction would stop prepare with scikit-learn's traceback."""
    name, classes, errors = data.name, SHAPES[data.name][2], []
    held_out = [("test_fraction", data.test_fraction)] if name == "digits" else []  # the others keep their own
    left = SAMPLES[name]
    for key, fraction in held_out + [("val_fraction", data.val_fraction)]:
        held = math.ceil(fraction * left)
        if held < classes:
            errors.append(f"data.{key}: {fraction} of {name}'s {left} samples holds out {held}, fewer than its "
                          f"{classes} classes (a stratified split needs one of each): use "
                          f"{math.ceil(classes / left * 1e4) / 1e4:g} or more")
        left -= held
    return errors


def check_machine(p: Params, path: str | Path = "params.yaml") -> None:
    """What validate adds to load_params: sizes counted on torch's meta device (nothing allocated), so a
    student no smaller than its teacher, or a model that could never fit in memory, is refused naming its
    key; and a device this machine does not have. Costs a torch import: the stages skip it."""
    _raise(_size_checks(p) + _device_checks(p), path)


def check_sizes(p: Params, path: str | Path = "params.yaml") -> None:
    """check_machine's size checks alone, which hold on any machine: `kdprune params` writes no file that
    validate would refuse on every one."""
    _raise(_size_checks(p), path)


def _raise(errors: list[str], path: str | Path) -> None:
    if errors:
        raise ParamsError("\n".join(f"{path}: {e}" for e in errors))


def _under_weights_dir(path: str) -> bool:
    parts = Path(path).parts
    return len(parts) >= 2 and parts[0] == WEIGHTS_DIR and ".." not in parts and not Path(path).is_absolute()


def _arch_checks(name: str, net: NetParams, dataset: str) -> list[str]:
    errors = []
    for key, value in (("channels", net.channels), ("hidden", net.hidden)):
        if net.arch not in OWN_ARCHS and value:
            errors.append(f"{name}.{key}: {net.arch} is torchvision's: its shape comes from {name}.width; "
                          f"must be [], got {value!r}")
    if net.arch == "mlp" and net.channels:
        errors.append(f"{name}.channels: an mlp has no conv layers, must be [], got {net.channels!r}")
    if net.arch in ("cnn", "resnet") and not net.channels:
        errors.append(f"{name}.channels: a {net.arch} needs at least one conv stage")
    size, depth = SHAPES[dataset][1], len(net.channels)  # a cnn halves its image per stage, flooring (a
    if net.arch == "cnn" and size >> depth < 1:  # resnet's padded stride-2 convs keep at least one pixel)
        errors.append(f"{name}.channels: {depth} pooling stages shrink {dataset}'s {size}x{size} images below "
                      f"one pixel")
    return errors


def _size_checks(p: Params) -> list[str]:
    from kdprune.models import model_size_on_meta

    c, s, k = SHAPES[p.data.name]
    sizes = {}
    for name in ("teacher", "student"):
        net = getattr(p, name)
        try:
            sizes[name] = model_size_on_meta(net.spec(c, s, k))
        except ValueError as e:
            return [f"{name}: {e}"]
    if sizes["student"] >= sizes["teacher"]:
        return [f"student: the student ({sizes['student']:,} parameters) is not smaller than its teacher "
                f"({sizes['teacher']:,}): shrink student.channels, student.hidden or student.width"]
    return []


def _device_checks(p: Params) -> list[str]:
    keys = [k for k, v in (("device", p.device), ("evaluate.device", p.evaluate.device)) if v == "cuda"]
    if not keys:
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [f"{k}: cuda, but this machine has no CUDA device (use {'auto or ' if k == 'device' else ''}cpu)"
            for k in keys]


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


def section(p: Params, *names: str) -> dict[str, Any]:
    """The flattened params a stage reads: section names ('teacher') or single keys ('seed')."""
    flat = flatten(p)
    return {k: v for k, v in flat.items() if any(k == n or k.startswith(n + ".") for n in names)}
