"""Every model measured the same way for the evaluate stage: accuracy from one prediction pass, size,
MACs, its ONNX export checked, latency in eager PyTorch and ONNX Runtime, and ratios between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdprune.checkpoints import MODEL_FILE
from kdprune.data import Normaliser, Split, batches
from kdprune.export import check_onnx
from kdprune.inference import predict
from kdprune.measure import Timing, count_macs, count_nonzero, gzip_size, latency_table, speedup
from kdprune.models import count_params
from kdprune.progress import Progress
from kdprune.recipes import ONNX_FILE

REFERENCES = ("teacher", "student")  # the models every compressed one is compared against
HEADLINE_BATCH = 256  # validate requires it among evaluate.batch_sizes


def measure(models: dict[str, nn.Module], dirs: dict[str, Path], test: Split, norm: Normaliser, cfg: Any,
            num_classes: int) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Per model: its metrics, and its confusion matrix (K, K) (rows: true class, columns: predicted)."""
    x = torch.cat([xb for xb, *_ in batches(test, 1024, norm)])  # (N, C, H, W) float, the test split once
    y = test.y
    results, matrices, preds = {}, {}, {}
    with Progress("evaluate", len(models), unit="model") as progress:
        for name, model in models.items():
            Progress.say(f"evaluate: {name}: predictions, ONNX check, size")
            logits = predict(model, test, norm).cpu()  # the one prediction pass of this model
            preds[name] = logits.argmax(1)
            matrices[name] = torch.bincount(y * num_classes + preds[name], minlength=num_classes**2) \
                .view(num_classes, num_classes)
            results[name] = _static(model.cpu(), dirs[name], x, preds[name], y, cfg.threads)
            progress.step()
    for name in models:
        results[name]["teacher_agreement"] = int((preds[name] == preds["teacher"]).sum()) / len(y)
    Progress.say(f"evaluate: latency, {cfg.rounds} interleaved rounds at batch sizes {cfg.batch_sizes}")
    timings = latency_table(models, {n: dirs[n] / ONNX_FILE for n in models}, x, cfg.batch_sizes, cfg.threads,
                            cfg.rounds, cfg.warmup, cfg.device)
    for name, table in timings.items():
        results[name] |= _latencies(table)
    _ratios(results, timings, cfg.batch_sizes, len(y))
    return results, matrices


def _static(model: nn.Module, model_dir: Path, x: torch.Tensor, preds: torch.Tensor, y: torch.Tensor,
            threads: int) -> dict[str, Any]:
    return {**scored(preds, y),
            "params": count_params(model), "nonzero_params": count_nonzero(model), "macs": count_macs(model, x),
            "size_bytes": (model_dir / MODEL_FILE).stat().st_size, "gzip_bytes": gzip_size(model_dir / MODEL_FILE),
            "onnx_bytes": (model_dir / ONNX_FILE).stat().st_size,  # the file MLflow logs and the registry serves
            "onnx_max_abs_diff": check_onnx(model_dir / ONNX_FILE, model, x, atol=1e-4, threads=threads)}


def scored(preds: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Errors, and accuracy as the exact share of right predictions (a float32 mean was off in the 8th digit:
    a drop of exactly evaluate.max_accuracy_drop came out either side of it)."""
    errors = int((preds != y).sum())
    return {"accuracy": (len(y) - errors) / len(y), "errors": errors}


def _latencies(table: dict[str, Timing]) -> dict[str, Any]:
    """latency_ms_b<B> (eager PyTorch) and ort_latency_ms_b<B> (ONNX Runtime): medians, with their IQR
    and whether the spread was too wide to trust."""
    out: dict[str, Any] = {}
    for key, t in table.items():
        runtime, b = key.split("_b")
        prefix = "latency" if runtime == "torch" else "ort_latency"
        out |= {f"{prefix}_ms_b{b}": t.median, f"{prefix}_iqr_ms_b{b}": t.iqr, f"{prefix}_noisy_b{b}": t.noisy}
    return out


def _ratios(results: dict[str, dict[str, Any]], timings: dict[str, dict[str, Timing]], sizes: list[int],
            tested: int) -> None:
    """Each compressed model against the teacher and the student: sizes, accuracy (drops counted in errors
    out of the `tested` samples), paired speed-ups with their IQR, and how much of the MACs cut became time
    (speed-up / MACs reduction)."""
    for name, r in results.items():
        if name in REFERENCES:
            continue
        for ref in REFERENCES:
            for key in ("params", "nonzero_params", "macs"):
                r[f"{key}_vs_{ref}"] = r[key] / results[ref][key]
            r[f"accuracy_drop_vs_{ref}"] = (r["errors"] - results[ref]["errors"]) / tested
            for runtime, prefix in (("torch", ""), ("onnx", "ort_")):
                for b in sizes:
                    s = speedup(timings[ref][f"{runtime}_b{b}"], timings[name][f"{runtime}_b{b}"])
                    r[f"{prefix}speedup_b{b}_vs_{ref}"] = s.median
                    r[f"{prefix}speedup_iqr_b{b}_vs_{ref}"] = s.iqr
                    r[f"{prefix}speedup_noisy_b{b}_vs_{ref}"] = s.noisy
        macs_cut = results["student"]["macs"] / r["macs"]
        for prefix in ("", "ort_"):
            r[f"{prefix}time_per_macs_b{HEADLINE_BATCH}"] = r[f"{prefix}speedup_b{HEADLINE_BATCH}_vs_student"] / macs_cut
    scratch, student = results["student_scratch"], results["student"]
    student["distill_gain"] = (scratch["errors"] - student["errors"]) / tested


def per_class_accuracy(counts: torch.Tensor) -> dict[str, float]:
    return {str(k): (counts[k, k] / counts[k].sum().clamp_min(1)).item() for k in range(len(counts))}


HEADLINE = {  # metrics/headline.json, DVC's declared metric: the dozen numbers a sweep is compared on, named
    # short so that `dvc exp show` fits a terminal (no '/': `--drop` takes regular expressions); the
    # fine-tuned model unless the name says otherwise
    "acc": ("finetuned", "accuracy"),
    "acc_drop": ("finetuned", "accuracy_drop_vs_student"),
    "student_acc": ("student", "accuracy"),
    "teacher_acc": ("teacher", "accuracy"),
    "kd_gain": ("student", "distill_gain"),
    "params": ("finetuned", "params"),
    "params_vs_teacher": ("finetuned", "params_vs_teacher"),
    "params_vs_student": ("finetuned", "params_vs_student"),
    "macs_vs_student": ("finetuned", "macs_vs_student"),
    "ms@256": ("finetuned", "latency_ms_b256"),
    "speedup@256": ("finetuned", "speedup_b256_vs_student"),
    "ort_speedup@256": ("finetuned", "ort_speedup_b256_vs_student"),
}
SUMMARY = {  # the summary run's metrics: the fine-tuned model's, and the references the sweep report plots against
    "teacher": ("accuracy", "params", "macs", "latency_ms_b256"),
    "student": ("accuracy", "distill_gain", "params", "macs", "latency_ms_b256"),
    "finetuned": ("accuracy", "accuracy_drop_vs_student", "params", "params_vs_teacher", "params_vs_student",
                  "nonzero_params_vs_teacher", "macs", "macs_vs_student", "latency_ms_b256", "ort_latency_ms_b256",
                  "speedup_b256_vs_student", "ort_speedup_b256_vs_student"),
}


def headline(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: results[model][key] for name, (model, key) in HEADLINE.items()}


def pick(results: dict[str, dict[str, Any]], keys: dict[str, tuple[str, ...]]) -> dict[str, dict[str, float]]:
    return {m: {k: results[m][k] for k in ks} for m, ks in keys.items()}
