"""The fit loop: minibatch training with the loss passed in, validated every epoch."""

from __future__ import annotations

import sys
import time
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

LossFn = Callable[..., torch.Tensor]  # loss_fn(logits, *targets) -> scalar
EpochHook = Callable[[int, dict[str, float]], None]


class OptimConfig(Protocol):
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float


def seed_everything(seed: int) -> None:
    """Same seed, same machine, same thread count: the same weights, bit for bit."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = {
        "adam": lambda: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True),
    }
    return optimizers[cfg.optimizer]()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, K) for inputs (N, C, H, W), in eval mode, on the model's device, returned on CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    logits = predict(model, x)
    return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |BatchNorm scale| where the model has BatchNorm (network slimming, Liu et al. 2017),
    else of |w| over the prunable layers: sparsity that makes unimportant units easy to see."""
    scales = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return sum(p.abs().sum() for p in scales or [u.layer.weight for u in model.units()])


def fit(model: nn.Module, train: tuple[torch.Tensor, ...], val: tuple[torch.Tensor, torch.Tensor],
        loss_fn: LossFn, cfg: OptimConfig, seed: int, device: torch.device,
        on_epoch: EpochHook | None = None, l1: float = 0.0) -> list[dict[str, float]]:
    """Train `model` in place on train = (x, y, *more targets), plus `l1` * l1_penalty(model);
    return one metrics dict per epoch."""
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        penalised = loss_fn if not l1 else lambda logits, *t: loss_fn(logits, *t) + l1 * l1_penalty(model)
        train_loss = _train_epoch(model, train, penalised, optimizer, cfg.batch_size, generator, device,
                                  f"epoch {epoch}/{cfg.epochs}")
        schedule.step()
        val_metrics = evaluate(model, *val)
        row = {"train_loss": train_loss, "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
               "lr": schedule.get_last_lr()[0], "epoch_seconds": time.perf_counter() - start}
        history.append(row)
        print(f"epoch {epoch}/{cfg.epochs} train_loss {train_loss:.4f} val_loss {row['val_loss']:.4f} "
              f"val_accuracy {row['val_accuracy']:.4f}", file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(epoch, row)
    return history


def _train_epoch(model: nn.Module, train: tuple[torch.Tensor, ...], loss_fn: LossFn,
                 optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                 device: torch.device, desc: str) -> float:
    """One pass over the shuffled train set; a progress bar on a terminal, nothing otherwise."""
    model.train()
    n = len(train[0])
    order = torch.randperm(n, generator=generator)
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=not sys.stderr.isatty()):
        idx = order[i:i + batch_size]
        x, *targets = (t[idx].to(device) for t in train)
        if len(x) < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            continue  # BatchNorm cannot train on a batch of one
        loss = loss_fn(model(x), *targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / n
