"""kdprune: compress neural networks by knowledge distillation and pruning, reproducibly."""

__version__ = "0.1.0"
