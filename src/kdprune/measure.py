"""What a model costs: params, non-zero params, MACs, bytes on disk, measured CPU latency."""

from __future__ import annotations

import gzip
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass at batch 1, dense (zeroed weights still cost)."""
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model.eval(), example[:1])
    return int(macs)


def gzip_size(path: str | Path) -> int:
    """Compressed bytes: what zeroed weights buy on disk."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=6, mtime=0))


@torch.inference_mode()
def latencies_ms(models: dict[str, nn.Module], example: torch.Tensor, batch_size: int, threads: int,
                 warmup: int, repeats: int) -> dict[str, float]:
    """Median forward time of each model, timed in turn, round after round: a slow spell of the
    machine (another process, a clock change) then hits every model alike, so ratios stay fair.
    Each timed pass follows an untimed one of the same model, so no model pays for the caches
    the previous one evicted."""
    x = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    times: dict[str, list[float]] = {name: [] for name in models}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m(x)
        for _ in range(repeats):
            for name, m in models.items():
                m(x)
                start = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(before)
    return {name: statistics.median(t) for name, t in times.items()}
