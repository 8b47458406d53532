"""A model's predictions on a split: logits once, and the loss and accuracy read off them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdprune.data import Normaliser, Split, batches


@torch.no_grad()
def predict(model: nn.Module, split: Split, norm: Normaliser, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, K) of the split's rows in order, in eval mode, on the model's device; returned there."""
    model.eval()
    device = next(model.parameters()).device
    split = split.to(device)
    return torch.cat([model(x) for x, *_ in batches(split, batch_size, norm)])


def evaluate(model: nn.Module, split: Split, norm: Normaliser) -> dict[str, float]:
    """Cross-entropy and accuracy on the split: one prediction pass, one host synchronisation."""
    logits = predict(model, split, norm)
    y = split.y if split.rows is None else split.y[split.rows]
    y = y.to(logits.device)
    loss, correct = F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()
    loss, correct = torch.stack([loss, correct]).tolist()
    return {"loss": loss, "accuracy": correct}
