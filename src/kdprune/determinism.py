"""torch set up so that the same params give the same bytes: the thread count, the seed, and
deterministic algorithms. Every stage does this first (stage.run); the benches call it too."""

from __future__ import annotations


def setup(seed: int, threads: int) -> None:
    """Intra-op threads change the order of floating-point sums, so they are a param; the seed fixes
    every initialisation and shuffle; deterministic algorithms rule out the nondeterministic kernels
    (scatter-add, some CUDA convolutions), warning instead of failing where none exists."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
