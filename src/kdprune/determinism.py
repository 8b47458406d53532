"""torch set up so that the same params give the same bytes: the thread count, the seed, and
deterministic algorithms. Every stage does this first (stage.run); the benches call it too."""

from __future__ import annotations

import sys


def setup(seed: int, threads: int) -> None:
    """Intra-op threads change the order of floating-point sums, so they are a param; the seed fixes
    every initialisation and shuffle; deterministic algorithms rule out the nondeterministic kernels
    (scatter-add, some CUDA convolutions), warning instead of failing where none exists."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    deterministic_algorithms()


def deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without its import of torch._inductor,
    which brings torch._dynamo with it (2 s on a 2-core machine, two thirds again of torch's own import)
    only to set inductor's flag for torch.compile, which no stage uses. Only the stages that train need
    torch._dynamo (an optimiser imports it), so validate starts that much sooner and the stages that do
    not train never import it. Inductor's flag is set where inductor is already imported (in a fork of
    the fork server it may be, in a stage's own process not: the same bytes, as nothing compiles);
    torch's own call is made where torch no longer has the kernel switch."""
    import torch

    switch = getattr(torch._C, "_set_deterministic_algorithms", None)
    if switch is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
        return
    switch(True, warn_only=True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True
