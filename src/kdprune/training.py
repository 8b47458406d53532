"""The fit loop: minibatch training with the loss passed in, validated every epoch, on any device."""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import nn

from kdprune.data import Normaliser, Split, batches
from kdprune.errors import ParamsError
from kdprune.inference import evaluate
from kdprune.progress import Progress

LossFn = Callable[..., torch.Tensor]  # loss_fn(logits, y, *extra targets) -> scalar
EpochHook = Callable[[int, dict[str, float]], None]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class FitConfig(Protocol):
    """params.FitParams: the one optimiser type of every fit."""
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def layout(model: nn.Module, device: torch.device) -> torch.memory_format:
    """Channels-last on the CPU (the digits CNNs train 1.4x faster at one thread: oneDNN's convolutions
    and max-pooling vectorise over channels), except for a model with a strided 1x1 convolution (a
    ResNet's downsampling): oneDNN's AVX2 kernel for that convolution's weight gradient writes past its
    workspace in channels-last when it has fewer input channels than its block (uxlfoundation/oneDNN
    #6035; torch 2.14.1 here aborted with a corrupted heap, elsewhere the gradients come out wrong), and
    pruning makes any channel count. Such a model, and any model on a GPU, trains in the default layout."""
    strided_1x1 = any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                      for m in model.modules())
    return torch.channels_last if device.type == "cpu" and not strided_1x1 else torch.contiguous_format


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = {
        "adam": lambda: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True),
    }
    return optimizers[cfg.optimizer]()


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |BatchNorm scale| where the model has BatchNorm (network slimming, Liu et al. 2017),
    else of |w| over its Linear and Conv layers: sparsity that makes unimportant units easy to see."""
    scales = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(p.abs().sum() for p in scales or weights)


def fit(model: nn.Module, train: Split, val: Split, norm: Normaliser, loss_fn: LossFn, cfg: FitConfig,
        seed: int, device: torch.device, on_epoch: EpochHook | None = None, l1: float = 0.0,
        augment: Augment | None = None, desc: str = "fit") -> list[dict[str, float]]:
    """Train `model` in place on `train` (targets: y, then the split's extra tensors) with a cosine-annealed
    learning rate, plus `l1` * l1_penalty(model); return one metrics dict per epoch (nothing measured:
    the same inputs give the same history). It trains in the memory layout `layout` picks and is handed
    back in torch's default one, the one checkpoints are written in. A loss that is no longer finite stops
    it (ParamsError) after that epoch's row is handed to `on_epoch`."""
    model.to(device, memory_format=layout(model, device))
    train, val = train.to(device), val.to(device)
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    generator = torch.Generator().manual_seed(seed)
    penalised = loss_fn if not l1 else lambda logits, *t: loss_fn(logits, *t) + l1 * l1_penalty(model)
    history = []
    try:
        for epoch in range(1, cfg.epochs + 1):
            steps = -(-len(train) // cfg.batch_size)
            lr = schedule.get_last_lr()[0]  # the rate this epoch trains at
            with Progress(f"{desc} epoch {epoch}/{cfg.epochs}", steps, unit="batch") as progress:
                train_loss = _train_epoch(model, train, norm, penalised, optimizer, cfg.batch_size, generator,
                                          augment, progress)
            schedule.step()
            scores = evaluate(model, val, norm)
            row = {"train_loss": train_loss, "val_loss": scores["loss"], "val_accuracy": scores["accuracy"],
                   "lr": lr}
            history.append(row)
            Progress.say(f"{desc} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f} "
                         f"val_loss {row['val_loss']:.4f} val_accuracy {row['val_accuracy']:.4f}")
            if on_epoch is not None:
                on_epoch(epoch, row)
            # diverged: stop (it had gone on, NaN epoch after NaN epoch, and the stage saved the NaN model)
            if not (math.isfinite(train_loss) and math.isfinite(row["val_loss"])):
                raise ParamsError(f"{desc}: training diverged in epoch {epoch} (train_loss {train_loss}, "
                                  f"val_loss {row['val_loss']}): lower its learning rate, {cfg.lr:g}")
    finally:  # (a failed fit's model, too)
        model.to(memory_format=torch.contiguous_format)
    return history


def _train_epoch(model: nn.Module, train: Split, norm: Normaliser, loss_fn: LossFn,
                 optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                 augment: Augment | None, progress: Progress) -> float:
    """One pass over the shuffled train split. The loss is summed on the device and read once at the
    end: no host synchronisation per step."""
    model.train()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    total = torch.zeros((), device=train.y.device)
    for x, *targets in batches(train, batch_size, norm, generator=generator, augment=augment):
        progress.step()
        if len(x) < 2 and has_bn:
            continue  # BatchNorm cannot train on a batch of one
        loss = loss_fn(model(x), *targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(x)
    return total.item() / max(len(train), 1)
