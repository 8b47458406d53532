"""kdprune.training and kdprune.determinism: the fit loop's layout and repeatability, and the torch set-up
every stage makes first."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.data import Normaliser, Split
from kdprune.errors import ParamsError
from kdprune.params import FitParams
from kdprune.training import fit, layout


def _fit_once(device: str = "cpu", on_epoch=None, lr: float = 0.01) -> tuple[nn.Module, list[dict[str, float]]]:
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(96) % 4)
    val = Split(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(32) % 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4))
    cfg = FitParams(epochs=2, batch_size=16, optimizer="sgd" if lr > 1 else "adam", lr=lr, weight_decay=0.0)
    history = fit(model, train, val, Normaliser(255.0, (0.5,) * 3, (0.25,) * 3), F.cross_entropy, cfg, seed=0,
                  device=torch.device(device), on_epoch=on_epoch and (lambda epoch, row: on_epoch(model)),
                  desc="test")
    return model, history


def test_fit_hands_the_model_back_in_the_default_layout_and_trains_the_same_twice() -> None:
    """On the CPU fit trains in channels-last layout; what it hands back (and a checkpoint then holds) is
    laid out as torch lays out a new tensor, and a second fit gives the very same weights and history."""
    during = []
    first, history = _fit_once(on_epoch=lambda model: during.append(
        model[4].weight.is_contiguous(memory_format=torch.channels_last) and not model[4].weight.is_contiguous()))
    assert during == [True, True]  # channels-last while it trains
    second, again = _fit_once()
    assert history == again and len(history) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
        assert a.stride() == torch.empty(a.shape).stride(), (name, a.stride())
    conv = first[4].weight  # 8 input channels: channels-last strides would differ from the default ones
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # an interpreter of its own: 3-5 s
def test_a_fit_that_diverges_stops_naming_the_epoch_and_the_learning_rate() -> None:
    """It had trained on, every later epoch NaN, and the stage saved a NaN model that every stage after it
    used. The diverged epoch is still handed to on_epoch (the run's curve shows it)."""
    seen = []
    with pytest.raises(ParamsError, match=r"^test: training diverged in epoch 1 \(train_loss (nan|inf), val_loss "
                                          r"nan\): lower its learning rate, 1e\+30$"):
        _fit_once(on_epoch=lambda model: seen.append(1), lr=1e30)
    assert seen == [1]


def test_a_model_with_a_strided_1x1_convolution_trains_in_the_default_layout() -> None:
    """Channels-last only where oneDNN computes it right: a strided 1x1 convolution with fewer input channels
    than oneDNN's block (a small ResNet's downsampling) corrupted the heap in channels-last (oneDNN #6035).
    Its fit, in an interpreter of its own (an abort would take the test's with it), ends and learns."""
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    downsampling = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert layout(cnn, cpu) == torch.channels_last and layout(cnn, cuda) == torch.contiguous_format
    assert layout(downsampling, cpu) == torch.contiguous_format
    out = subprocess.run([sys.executable, "-c", STRIDED_1X1_FIT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, last, layouts = out.stdout.split()
    assert float(last) < float(first)
    assert layouts == "default"  # every output of the convolution, while it trained


STRIDED_1X1_FIT = """
import torch, torch.nn.functional as F
from torch import nn
from kdprune.data import Normaliser, Split
from kdprune.params import FitParams
from kdprune.training import fit
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
split = Split(torch.randint(0, 256, (256, 4, 8, 8), dtype=torch.uint8, generator=g), torch.arange(256) % 4)
model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 16, 4))
seen = set()
model[0].register_forward_hook(lambda m, i, out: seen.add("default" if out.is_contiguous() else "other"))
cfg = FitParams(epochs=3, batch_size=64, optimizer="adam", lr=0.01, weight_decay=0.0)
h = fit(model, split, split, Normaliser(255.0, (0.5,) * 4, (0.25,) * 4), F.cross_entropy, cfg, seed=0,
        device=torch.device("cpu"), desc="strided 1x1")
print(h[0]["train_loss"], h[-1]["train_loss"], ",".join(sorted(seen)))
"""


def _in_a_fresh_interpreter(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


@pytest.mark.slow  # an interpreter of its own, and inductor's import: 4-5 s
def test_setup_turns_on_deterministic_algorithms_warning_only_without_importing_dynamo() -> None:
    """What torch.use_deterministic_algorithms(True, warn_only=True) turns on, at the seed and thread count
    asked for, without torch._dynamo (only the stages that train need it: their optimisers import it); and
    inductor's own flag, where inductor is imported."""
    out = _in_a_fresh_interpreter(
        "import sys, torch\n"
        "from kdprune.determinism import setup\n"
        "setup(7, 1)\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),\n"
        "      torch.get_num_threads(), torch.initial_seed(), 'torch._dynamo' in sys.modules)\n"
        "import torch._inductor.config as c\n"
        "c.deterministic = False\n"
        "setup(0, 1)\n"
        "print(c.deterministic)")
    assert out.splitlines() == ["True True 1 7 False", "True"]
