"""Soft labels: the teacher's logits on disk, checked as made from this teacher and this split, and the
KD loss over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from kdprune import manifest
from kdprune.checkpoints import load_tensors, save_tensors
from kdprune.data import UNLABELLED, Split, labelled_subset
from kdprune.distillation import kd_loss
from kdprune.errors import CheckpointError

LOGITS = "logits.pt"


def save(out: Path, logits: torch.Tensor) -> None:
    """logits.pt: the teacher's logits (N, K) on the train split, in the split's order."""
    save_tensors(out / LOGITS, {"train": logits.contiguous()})


def check_made_from(soft_dir: Path, fingerprints: dict[str, str], teacher_dir: Path, data_dir: Path) -> None:
    """Refuse soft labels whose manifest does not name this teacher and this prepared data as their source."""
    manifest.check_made_from(soft_dir, "teacher", teacher_dir, fingerprints["teacher"])
    manifest.check_made_from(soft_dir, "data", data_dir, fingerprints["data"])


def attach(train: Split, soft_dir: Path, label_fraction: float, seed: int) -> Split:
    """The train split with the teacher's logits as an extra target, and its hard labels withheld
    (UNLABELLED) outside the `label_fraction` the student may see: the subset train_scratch sees."""
    blob = load_tensors(soft_dir / LOGITS)
    logits = blob.get("train") if isinstance(blob, dict) else None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(train.y):
        raise CheckpointError(f"{soft_dir / LOGITS}: expected logits (N, K) for the {len(train.y)} train samples")
    y = torch.where(labelled_subset(train.y, label_fraction, seed), train.y, UNLABELLED)
    return train.with_labels(y).with_extra(logits.float())


def loss(distill: Any) -> Callable[..., torch.Tensor]:
    """The training loss over (logits, y, teacher logits) at the params' temperature and alpha."""
    return lambda logits, y, teacher: kd_loss(logits, teacher, y, distill.temperature, distill.alpha)
