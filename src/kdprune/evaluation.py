"""Every model measured the same way: accuracy, size, MACs and latency, and ratios between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdprune.checkpoints import MODEL_FILE
from kdprune.measure import count_macs, count_nonzero, gzip_size, latencies_ms
from kdprune.models import count_params
from kdprune.training import predict


def measure(model: torch.nn.Module, model_dir: Path, x: torch.Tensor, y: torch.Tensor, cfg: Any) -> dict[str, Any]:
    preds = predict(model, x).argmax(1)
    out = {"accuracy": (preds == y).float().mean().item(), "params": count_params(model),
           "nonzero_params": count_nonzero(model), "macs": count_macs(model, x),
           "size_bytes": (model_dir / MODEL_FILE).stat().st_size, "gzip_bytes": gzip_size(model_dir / MODEL_FILE)}
    return out


def confusion(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    preds = predict(model, x).argmax(1)
    return torch.bincount(y * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(counts: torch.Tensor) -> dict[str, float]:
    return {str(k): (counts[k, k] / counts[k].sum().clamp_min(1)).item() for k in range(len(counts))}


def compare(models: dict[str, torch.nn.Module], dirs: dict[str, Path], x: torch.Tensor, y: torch.Tensor,
            cfg: Any) -> dict[str, dict[str, Any]]:
    """Measure every model; add ratios against the teacher and the student, and what distillation added."""
    results = {name: measure(m, dirs[name], x, y, cfg) for name, m in models.items()}
    for b in cfg.batch_sizes:
        for name, ms in latencies_ms(models, x, b, cfg.threads, cfg.warmup, cfg.repeats).items():
            results[name][f"latency_ms_b{b}"] = ms
            results[name][f"throughput_b{b}"] = b / ms * 1e3  # samples per second
    teacher_preds = predict(models["teacher"], x).argmax(1)
    big = "latency_ms_b256"  # the headline batch size: validate requires it among evaluate.batch_sizes
    for name, m in models.items():
        r = results[name]
        r["teacher_agreement"] = (predict(m, x).argmax(1) == teacher_preds).float().mean().item()
        if name in ("teacher", "student"):
            continue
        for ref in ("teacher", "student"):
            for key in ("params", "nonzero_params", "macs"):
                r[f"{key}_vs_{ref}"] = r[key] / results[ref][key]
            r[f"accuracy_drop_vs_{ref}"] = results[ref]["accuracy"] - r["accuracy"]
        r["speedup_b256_vs_student"] = results["student"][big] / r[big]
    results["student"]["distill_gain"] = results["student"]["accuracy"] - results["student_scratch"]["accuracy"]
    return results
