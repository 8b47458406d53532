"""A user's own teacher (teacher.weights): a state_dict checked against the configured architecture,
evaluated on the validation split, and adopted instead of training one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdprune.checkpoints import check_state_dict, load_tensors
from kdprune.data import Normaliser, Split
from kdprune.inference import evaluate


def check_weights(spec: dict[str, Any], path: str | Path) -> None:
    """At validate: the file loads without running code and every tensor fits the teacher's architecture
    (`spec`, whose size validate has already bounded)."""
    from kdprune.models import build_model

    check_state_dict(build_model(spec), load_tensors(path), Path(path))


def adopt(model: nn.Module, path: str | Path, val: Split, norm: Normaliser,
          device: torch.device) -> list[dict[str, float]]:
    """Load the weights into `model`; return its one-row "history": its validation loss and accuracy."""
    state = load_tensors(path)
    check_state_dict(model, state, Path(path))
    model.load_state_dict(state)
    scores = evaluate(model.to(device), val, norm)
    return [{"val_loss": scores["loss"], "val_accuracy": scores["accuracy"]}]
