"""Soft labels: the teacher's logits on disk with the hashes of what made them, and the KD loss over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from kdprune.checkpoints import load_tensors, save_tensors
from kdprune.data import UNLABELLED, labelled_subset, load_meta, load_split
from kdprune.distillation import kd_loss
from kdprune.errors import CheckpointError
from kdprune.files import read_json, sha256, write_json

LOGITS, PROVENANCE = "logits.pt", "provenance.json"


def save(out: Path, logits: torch.Tensor, teacher_dir: Path, data_dir: Path) -> None:
    """logits.pt, and provenance.json with the hashes of the teacher file and train split they came from."""
    save_tensors(out / LOGITS, {"train": logits})
    write_json(out / PROVENANCE, {"teacher_sha256": sha256(teacher_dir / "model.pt"),
                                  "train_sha256": load_meta(data_dir)["sha256"]["train"]})


def check_provenance(soft_dir: Path, teacher_dir: Path, data_dir: Path) -> None:
    """Refuse soft labels that were not made by this teacher file on this train split."""
    made = read_json(soft_dir / PROVENANCE)
    have = {"teacher": sha256(teacher_dir / "model.pt"), "train": load_meta(data_dir)["sha256"]["train"]}
    for what, path in (("teacher", teacher_dir / "model.pt"), ("train", data_dir / "train.pt")):
        if made[f"{what}_sha256"] != have[what]:
            raise CheckpointError(f"{soft_dir / PROVENANCE} was made from another {what} than {path}: "
                                  f"re-run soft_labels, or pass the {what} it was made from")


def load_train(data_dir: Path, soft_dir: Path, label_fraction: float = 1.0, seed: int = 0) -> tuple:
    """(x, y, teacher logits) of the train split; y is UNLABELLED outside the `label_fraction`
    whose hard labels the student may see (the same stratified subset train_scratch sees)."""
    x, y = load_split(data_dir, "train")
    logits = load_tensors(soft_dir / LOGITS)["train"]
    if logits.shape[0] != len(y):
        raise CheckpointError(f"{soft_dir / LOGITS} has {logits.shape[0]} rows, {data_dir} has {len(y)}")
    y = torch.where(labelled_subset(y, label_fraction, seed), y, UNLABELLED)
    return x, y, logits


def loss(distill: Any) -> Callable[..., torch.Tensor]:
    """The training loss over (logits, y, teacher logits) at the params' temperature and alpha."""
    return lambda logits, y, teacher: kd_loss(logits, teacher, y, distill.temperature, distill.alpha)
