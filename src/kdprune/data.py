"""Datasets: read a source (sklearn digits, torchvision sets), split it, and load the prepared splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdprune.checkpoints import load_tensors, save_tensors
from kdprune.errors import CheckpointError, DataError
from kdprune.files import read_json, sha256, write_json

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


def _torchvision(cls_name: str, folder: str, files: list[str]) -> Callable[[Path, bool], Source]:
    def read(raw_dir: Path, download: bool) -> Source:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            train, test = (cls(str(raw_dir), train=t, download=download) for t in (True, False))
        except Exception as e:  # torchvision raises RuntimeError when absent, URLError when offline
            where = raw_dir / folder
            why = f"download failed: {type(e).__name__}" if download else "data.download is false"
            raise DataError(f"{cls_name} is not under {where} ({why}): "
                            f"place {', '.join(files)} in {where}/") from e
        return Source(*_arrays(train), 255.0, _arrays(test))
    return read


def _arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(ds.data, dtype=np.uint8)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C) -> (N, C, H, W)
    return np.ascontiguousarray(x), np.asarray(ds.targets, dtype=np.int64)


_IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
SOURCES: dict[str, Callable[[Path, bool], Source]] = {
    "digits": _digits,
    "mnist": _torchvision("MNIST", "MNIST/raw", _IDX),
    "fashion_mnist": _torchvision("FashionMNIST", "FashionMNIST/raw", _IDX),
    "cifar10": _torchvision("CIFAR10", "cifar-10-batches-py",
                            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
}


def split(src: Source, val_fraction: float, test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified train/val/test indices, deterministic from the seed; a source's own test split is kept."""
    from sklearn.model_selection import train_test_split

    x, y = src.x, src.y
    if src.test is None:
        x, x_test, y, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    else:
        x_test, y_test = src.test
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def prepare(name: str, raw_dir: Path, out_dir: Path, val_fraction: float, test_fraction: float,
            seed: int, download: bool) -> dict[str, Any]:
    """Write <split>.pt (uint8 images, labels) and meta.json (shape, classes, train-only normalisation)."""
    src = SOURCES[name](raw_dir, download)
    splits = split(src, val_fraction, test_fraction, seed)
    train = splits["train"][0].astype(np.float64) / src.scale  # (N, C, H, W)
    meta = {
        "name": name, "scale": src.scale,
        "in_channels": int(src.x.shape[1]), "image_size": int(src.x.shape[2]),
        "num_classes": int(max(src.y.max(), splits["test"][1].max()) + 1),
        "mean": train.mean(axis=(0, 2, 3)).tolist(), "std": train.std(axis=(0, 2, 3)).tolist(),
        "counts": {s: int(len(v[1])) for s, v in splits.items()}, "sha256": {},
    }
    for s, (x, y) in splits.items():
        tensors = {"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.from_numpy(np.ascontiguousarray(y))}
        save_tensors(out_dir / f"{s}.pt", tensors)
        meta["sha256"][s] = sha256(out_dir / f"{s}.pt")
    write_json(out_dir / META_FILE, meta)
    return meta


def labelled_subset(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A stratified boolean mask (N,) of the samples whose hard labels may be used."""
    if fraction >= 1.0:
        return torch.ones(len(y), dtype=torch.bool)
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(y)), train_size=fraction, stratify=y.numpy(), random_state=seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[torch.from_numpy(keep)] = True
    return mask


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(data_dir) / META_FILE)


def load_split(data_dir: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x normalised float32 (N, C, H, W), y int64 (N,)) of one prepared split."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    blob = load_tensors(data_dir / f"{name}.pt")
    if not isinstance(blob, dict) or set(blob) != {"x", "y"} or len(blob["x"]) != len(blob["y"]):
        raise CheckpointError(f"{data_dir / f'{name}.pt'}: not a prepared split (expected tensors x and y)")
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1).clamp_min(1e-8)
    x = (blob["x"].float() / meta["scale"] - mean) / std
    return x.float(), blob["y"].long()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, limit: int | None = None, seed: int | None = None) -> list[tuple]:
    """[(x, y), ...] in chunks of batch_size: the first `limit` samples, shuffled by `seed` when given."""
    if seed is not None:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        x, y = x[order], y[order]
    n = len(y) if limit is None else min(limit, len(y))
    return [(x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]) for i in range(0, n, batch_size)]
