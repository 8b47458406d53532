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
def latency_ms(model: nn.Module, example: torch.Tensor, batch_size: int, threads: int,
               warmup: int, repeats: int) -> float:
    """Median wall time of one forward pass at `batch_size`, after warm-up, at a fixed thread count."""
    x = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    model.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)
