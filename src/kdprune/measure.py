"""What a model costs: params, non-zero params, MACs, bytes on disk, and latency timed so that it can be trusted."""

from __future__ import annotations

import gc
import gzip
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnxruntime as ort
import torch
from torch import nn

from kdprune.export import INPUT, OUTPUT, eval_on, ort_session, to_numpy

# A figure whose interquartile range exceeds this fraction of its median is reported as noisy, not as a
# number. On a shared 2-core machine, 30 rounds of small CNNs spread by 6-10 % in ONNX Runtime, by 9-13 %
# in eager PyTorch at batch 256 and by 16-28 % at batch 1 (Python overhead jitters); the paired ratios of
# two identical models spread by under 10 %, which is what pairing buys.
NOISY_IQR = 0.15
MIN_ROUNDS = 5  # below this the quartiles are guesses: always noisy

Runner = Callable[[], None]


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass at batch 1, dense (zeroed weights still cost).

    Torch-Pruning's count: a conv or linear layer's multiply-adds plus one per bias add, and one per
    element through BatchNorm (two when affine), ReLU and pooling. It counts on a copy of the model.
    """
    import torch_pruning as tp

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    macs, _ = tp.utils.count_ops_and_params(model, example[:1].to(device))
    return int(macs)


def gzip_size(path: str | Path) -> int:
    """Compressed bytes: what zeroed weights buy on disk."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=6, mtime=0))


def _quartiles(samples: tuple[float, ...]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


@dataclass(frozen=True)
class Spread:
    """Samples, one per round, with their median and quartiles."""

    samples: tuple[float, ...] = field(repr=False)
    median: float = field(init=False)
    q1: float = field(init=False)
    q3: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"{type(self).__name__} needs at least one sample")
        q1, median, q3 = _quartiles(tuple(self.samples))
        object.__setattr__(self, "samples", tuple(self.samples))
        object.__setattr__(self, "q1", q1)
        object.__setattr__(self, "median", median)
        object.__setattr__(self, "q3", q3)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def relative_iqr(self) -> float:
        return self.iqr / abs(self.median) if self.median else float("inf")

    @property
    def noisy(self) -> bool:
        """Too spread (relative IQR above NOISY_IQR) or too few rounds to print as a confident figure."""
        return len(self.samples) < MIN_ROUNDS or self.relative_iqr > NOISY_IQR


@dataclass(frozen=True)
class Timing(Spread):
    """Milliseconds per call of one runner, one sample per round of time_rounds."""


@dataclass(frozen=True)
class Ratio(Spread):
    """Per-round speed-ups base / other (> 1: other is faster); noisy when they disagree too much to claim one."""


def speedup(base: Timing, other: Timing) -> Ratio:
    """Speed-up of `other` over `base` from PAIRED rounds: round i of both ran back to back on the same
    machine, so a slow spell scales both and cancels in their ratio; it would not in median / median.
    Even paired, two identical ONNX Runtime sessions gave 1.08 on an H100 host: read a ratio within
    about 10 % of 1 as no speed-up."""
    if len(base.samples) != len(other.samples):
        raise ValueError(f"speedup needs timings from the same rounds: {len(base.samples)} vs "
                         f"{len(other.samples)} samples")
    return Ratio(tuple(b / o for b, o in zip(base.samples, other.samples)))


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def time_rounds(runners: dict[str, Runner], rounds: int, warmup: int) -> dict[str, Timing]:
    """Time every runner once per round, in turn, round after round.

    A slow spell of the machine then hits every runner alike, so their per-round ratios stay fair
    (see speedup). Each timed call follows an untimed call of the same runner, so no runner pays for
    caches the previous one evicted (nor for switching torch's thread count); the order rotates each
    round so no runner always comes first. The garbage collector is paused, as timeit does, and
    torch's thread count is restored afterwards, also when a runner raises.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"time_rounds needs rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    names = list(runners)
    if not names:
        return {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    threads, gc_was_on = torch.get_num_threads(), gc.isenabled()
    gc.disable()
    try:
        for name in names:
            for _ in range(warmup):
                runners[name]()
        for r in range(rounds):
            for name in _rotated(names, r):
                run = runners[name]
                run()
                start = time.perf_counter_ns()
                run()
                samples[name].append((time.perf_counter_ns() - start) / 1e6)
    finally:
        torch.set_num_threads(threads)
        if gc_was_on:
            gc.enable()
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def torch_runner(model: nn.Module, x: torch.Tensor, threads: int, device: str | torch.device) -> Runner:
    """One eager forward of `model` (eval mode, on `device`, a copy if it is elsewhere) on batch x.

    Each call sets torch's thread count to `threads` when it differs, under inference_mode; on CUDA it
    waits for the GPU to finish. Time it with time_rounds, which restores the thread count.
    """
    device = torch.device(device)
    model, x = eval_on(model, device), x.to(device)

    def run() -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def ort_runner(session: ort.InferenceSession, x: torch.Tensor) -> Runner:
    """One ONNX Runtime call of `session` on batch x (converted to numpy once, outside the timing)."""
    feed = {INPUT: to_numpy(x)}

    def run() -> None:
        session.run([OUTPUT], feed)

    return run


def batch_of(example: torch.Tensor, size: int) -> torch.Tensor:
    """(size, ...) rows of `example`, repeated from the top when it has fewer."""
    return example[torch.arange(size) % len(example)].contiguous()


def latency_table(models: dict[str, nn.Module], onnx_paths: dict[str, Path], example: torch.Tensor,
                  batch_sizes: list[int], threads: int, rounds: int, warmup: int,
                  device: str | torch.device) -> dict[str, dict[str, Timing]]:
    """{model: {"torch_b<B>": Timing, "onnx_b<B>": Timing}} for every model and batch size.

    Eager PyTorch runs on `device`, ONNX Runtime on the CPU with `threads` intra-op threads. Within each
    (runtime, batch size) all models are interleaved, so speedup() of two entries with the same key is
    paired.
    """
    if set(onnx_paths) != set(models):
        raise ValueError(f"latency_table needs one ONNX file per model: models {sorted(models)}, "
                         f"files {sorted(onnx_paths)}")
    placed = {name: eval_on(m, device) for name, m in models.items()}
    sessions = {name: ort_session(onnx_paths[name], threads) for name in models}
    table: dict[str, dict[str, Timing]] = {name: {} for name in models}
    for b in batch_sizes:
        x = batch_of(example, b)  # (b, ...)
        groups = {"torch": {name: torch_runner(m, x, threads, device) for name, m in placed.items()},
                  "onnx": {name: ort_runner(s, x) for name, s in sessions.items()}}
        for runtime, runners in groups.items():
            for name, timing in time_rounds(runners, rounds, warmup).items():
                table[name][f"{runtime}_b{b}"] = timing
    return table
