"""Datasets: read a source (sklearn digits, torchvision sets), split it, and serve the prepared splits.

Images stay uint8 from disk to device; a batch is normalised (and augmented) only when it is
taken, so memory never holds a float copy of a split. A subset is a tensor of row indices, never
a copy of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from kdprune.checkpoints import load_tensors, save_tensors
from kdprune.errors import CheckpointError, DataError
from kdprune.files import read_json, write_json

SPLITS = ("train", "val", "test")
UNLABELLED = -1  # a label withheld from the student (student.label_fraction < 1)
META_FILE = "meta.json"


@dataclass(frozen=True)
class Source:
    """Raw images as uint8 (N, C, H, W), labels (N,), and the value that maps pixels to [0, 1]."""
    x: np.ndarray
    y: np.ndarray
    scale: float
    test: tuple[np.ndarray, np.ndarray] | None  # the dataset's own test split, when it has one


def _digits(raw_dir: Path, download: bool) -> Source:
    from sklearn.datasets import load_digits  # ships with scikit-learn: works offline

    d = load_digits()
    return Source(d.images.astype(np.uint8)[:, None], d.target.astype(np.int64), 16.0, None)


def _torchvision(cls_name: str, folder: str, files: list[str],
                 older: tuple[str, ...] = ()) -> Callable[[Path, bool], Source]:
    """A torchvision dataset's reader: `files` in `folder` (the layout named to a user who has none), or
    `older`, a layout torchvision still reads first, under the raw folder."""
    def read(raw_dir: Path, download: bool) -> Source:
        where = raw_dir / folder

        def absent(why: str) -> DataError:
            return DataError(f"{cls_name} is not under {where} ({why}): place {', '.join(files)} in {where}/")

        layouts = [[where / f for f in files]] + ([[raw_dir / f for f in older]] if older else [])
        present = next((layout for layout in layouts if all(path.is_file() for path in layout)), None)
        if not download and present is None:
            raise absent("data.download is false")  # at once: torchvision's import alone takes seconds
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            train, test = (cls(str(raw_dir), train=t, download=download) for t in (True, False))
        except Exception as e:  # torchvision raises RuntimeError when absent or damaged, URLError when offline
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
            if present is not None:  # every file there, and torchvision cannot read them
                raise DataError(f"{cls_name} in {present[0].parent} cannot be read ({why}): a file there is "
                                f"damaged or cut short; replace {', '.join(p.name for p in present)}") from e
            raise absent(f"download failed: {why}") from e
        return Source(*_arrays(train), 255.0, _arrays(test))
    return read


def _arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(ds.data, dtype=np.uint8)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C) -> (N, C, H, W)
    return np.ascontiguousarray(x), np.asarray(ds.targets, dtype=np.int64)


_IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _processed(name: str) -> tuple[str, ...]:  # torchvision's older MNIST layout: tensors it loads weights-only
    return f"{name}/processed/training.pt", f"{name}/processed/test.pt"


SOURCES: dict[str, Callable[[Path, bool], Source]] = {
    "digits": _digits,
    "mnist": _torchvision("MNIST", "MNIST/raw", _IDX, _processed("MNIST")),
    "fashion_mnist": _torchvision("FashionMNIST", "FashionMNIST/raw", _IDX, _processed("FashionMNIST")),
    "cifar10": _torchvision("CIFAR10", "cifar-10-batches-py",
                            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
}


def split(src: Source, val_fraction: float, test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified train/val/test, deterministic from the seed; a source's own test split is kept."""
    from sklearn.model_selection import train_test_split

    x, y = src.x, src.y
    if src.test is None:
        x, x_test, y, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    else:
        x_test, y_test = src.test
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def channel_stats(x: np.ndarray, scale: float, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) over [0, 1]: exact integer sums, in chunks,
    so no float copy of the split is ever made."""
    total = np.zeros(x.shape[1], dtype=np.int64)
    squares = np.zeros(x.shape[1], dtype=np.int64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].astype(np.int64)  # (chunk, C, H, W): one chunk at a time
        total += part.sum(axis=(0, 2, 3))
        squares += (part * part).sum(axis=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    return (mean / scale).tolist(), (std / scale).tolist()


def prepare(name: str, raw_dir: Path, out_dir: Path, val_fraction: float, test_fraction: float,
            seed: int, download: bool) -> dict[str, Any]:
    """Write <split>.pt (uint8 images, int64 labels) and meta.json (shape, classes, train-only statistics)."""
    src = SOURCES[name](raw_dir, download)
    splits = split(src, val_fraction, test_fraction, seed)
    mean, std = channel_stats(splits["train"][0], src.scale)
    meta = {
        "name": name, "scale": src.scale, "mean": mean, "std": std,
        "in_channels": int(src.x.shape[1]), "image_size": int(src.x.shape[2]),
        "num_classes": int(max(src.y.max(), splits["test"][1].max()) + 1),
        "counts": {s: int(len(v[1])) for s, v in splits.items()},
    }
    for s, (x, y) in splits.items():
        save_tensors(out_dir / f"{s}.pt", {"x": torch.from_numpy(np.ascontiguousarray(x)),
                                             "y": torch.from_numpy(np.ascontiguousarray(y))})
    write_json(out_dir / META_FILE, meta)
    return meta


@dataclass(frozen=True)
class Split:
    """A prepared split: uint8 images (N, C, H, W), int64 labels (N,), optional per-sample targets
    (teacher logits (N, K)), and the rows in use (a subset without copying)."""
    x: torch.Tensor
    y: torch.Tensor
    extra: tuple[torch.Tensor, ...] = ()
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y) if self.rows is None else len(self.rows)

    def to(self, device: torch.device) -> Split:
        """Moved once per stage; batches are then cut on the device."""
        rows = None if self.rows is None else self.rows.to(device)
        return Split(self.x.to(device), self.y.to(device), tuple(t.to(device) for t in self.extra), rows)

    def subset(self, rows: torch.Tensor) -> Split:
        """The given rows (indices into the current ones), as a view."""
        base = torch.arange(len(self.y), device=self.y.device) if self.rows is None else self.rows
        return replace(self, rows=base[rows.to(base.device)])

    def with_labels(self, y: torch.Tensor) -> Split:
        return replace(self, y=y)

    def with_extra(self, *extra: torch.Tensor) -> Split:
        return replace(self, extra=extra)


@dataclass(frozen=True)
class Normaliser:
    """uint8 pixels to the float inputs a model sees: / scale, then (x - mean) / std per channel."""
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) uint8 -> float32
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(shape)
        std = torch.tensor(self.std, device=x.device).view(shape).clamp_min(1e-8)
        return (x.float() / self.scale - mean) / std


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    meta = read_json(Path(data_dir) / META_FILE)
    needed = ("scale", "mean", "std", "in_channels", "image_size", "num_classes")
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise CheckpointError(f"{Path(data_dir) / META_FILE}: not a prepared split's meta.json "
                              f"(needs {', '.join(needed)})")
    return meta


def normaliser(meta: dict[str, Any]) -> Normaliser:
    return Normaliser(float(meta["scale"]), tuple(meta["mean"]), tuple(meta["std"]))


def load_split(data_dir: str | Path, name: str) -> Split:
    """One prepared split, as stored (uint8 images, int64 labels), on the CPU."""
    path = Path(data_dir) / f"{name}.pt"
    blob = load_tensors(path)
    if not isinstance(blob, dict) or set(blob) != {"x", "y"} or blob["x"].dtype != torch.uint8 \
            or blob["x"].dim() != 4 or len(blob["x"]) != len(blob["y"]):
        raise CheckpointError(f"{path}: not a prepared split (expected uint8 images x (N, C, H, W) and labels y)")
    return Split(blob["x"], blob["y"].long())


def batches(split: Split, batch_size: int, norm: Normaliser, *, generator: torch.Generator | None = None,
            limit: int | None = None, augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """(x, y, *extra) batches on the split's device: in order, or shuffled by `generator`; the first
    `limit` rows of that order only; normalised, and augmented when `augment` is given."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order[: n if limit is None else min(limit, n)].to(split.y.device)
    if split.rows is not None:
        order = split.rows[order]
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x = split.x[idx]  # (B, C, H, W) uint8
        if augment is not None:
            x = augment(x, generator)
        yield (norm(x), split.y[idx], *(t[idx] for t in split.extra))


def materialise(split: Split, batch_size: int, norm: Normaliser, limit: int, seed: int) -> list[tuple]:
    """The first `limit` rows of a seeded shuffle as a list of (x, y) batches: what the scorers take."""
    g = torch.Generator().manual_seed(seed)
    return [(x, y) for x, y, *_ in batches(split, batch_size, norm, generator=g, limit=limit)]


def augmenter(crop: int, flip: bool) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """Random crop after zero padding by `crop` pixels and random horizontal flip, per sample, on the
    batch's device; the random numbers come from the CPU generator, so a run is the same on any device."""
    if not crop and not flip:
        return None

    def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # (B, C, H, W) uint8
        b, _, h, w = x.shape
        if crop:
            padded = torch.nn.functional.pad(x, (crop, crop, crop, crop))  # (B, C, H + 2c, W + 2c)
            dy, dx = (torch.randint(0, 2 * crop + 1, (b, 1), generator=g).to(x.device) for _ in range(2))
            rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
            cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
        if flip:
            mirror = (torch.rand(b, generator=g) < 0.5).to(x.device)
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        return x.contiguous()
    return augment


def labelled(split: Split, fraction: float, seed: int) -> Split:
    """The rows of `split` whose hard labels may be used (student.label_fraction, labelled_subset): the
    split itself at 1. Every use of a train label downstream of the students goes through it: the control's
    fit, the scorers' and the oracle's losses, the recovery fits between prune rounds."""
    if fraction >= 1.0:
        return split
    y = split.y if split.rows is None else split.y[split.rows]  # the labels of the rows in use, in their order
    return split.subset(torch.nonzero(labelled_subset(y, fraction, seed)).squeeze(1))


def cycled(split: Split, length: int) -> Split:
    """`split`'s rows repeated in order to `length` rows (`split` itself where it has as many): epochs of as
    many batches, and optimiser steps, as epochs over `length` rows. Each epoch's shuffle mixes the copies.
    The scratch control's labelled rows, cycled to the train split's length: as many steps as the student."""
    if len(split) >= length:
        return split
    return split.subset(torch.arange(length) % len(split))


def labelled_subset(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A stratified boolean mask (N,) of the samples whose hard labels may be used: per class, the first
    round(fraction * count) of a seeded permutation (at least one). Written here rather than taken from
    scikit-learn, whose import costs a second in every training stage."""
    if fraction >= 1.0:
        return torch.ones(len(y), dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    mask = torch.zeros(len(y), dtype=torch.bool)
    ranked = y.cpu()[order]
    for c in torch.unique(ranked).tolist():
        members = order[ranked == c]  # this class's rows, in the seeded order
        mask[members[: max(1, round(fraction * len(members)))]] = True
    return mask
