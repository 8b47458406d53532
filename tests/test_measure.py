"""Costs and timing: MACs by hand, interleaved rounds, paired speed-ups, spread statistics on fixed numbers."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from kdprune.export import export_onnx
from kdprune.measure import (MIN_ROUNDS, NOISY_IQR, Ratio, Timing, batch_of, count_macs, latency_table, speedup,
                             time_rounds, torch_runner)
from tests.conftest import REPO


def mlp() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def test_count_macs_of_a_conv_and_a_linear_layer_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.zeros(5, 1, 6, 6)  # batch 5: only the first row is counted
    conv = 2 * 4 * 4 * (1 * 3 * 3) + 2 * 4 * 4  # per output element: 9 multiply-adds, one bias add
    relu = 2 * 4 * 4  # one per element, in Torch-Pruning's count
    linear = 32 * 3 + 3
    assert count_macs(model, x) == conv + relu + linear == 451


def test_timing_statistics_on_fixed_numbers():
    t = Timing((5.0, 1.0, 4.0, 2.0, 3.0))
    assert (t.q1, t.median, t.q3, t.iqr) == (2.0, 3.0, 4.0, 2.0)
    assert t.samples == (5.0, 1.0, 4.0, 2.0, 3.0)  # in round order, not sorted
    with pytest.raises(ValueError):
        Timing(())


def test_noisy_flags_a_wide_spread_and_too_few_rounds_but_not_a_tight_one():
    tight = Timing((10.0, 10.1, 9.9, 10.05, 9.95, 10.02))
    wide = Timing((6.0, 10.0, 14.0, 9.0, 12.0, 8.0))
    assert tight.relative_iqr < NOISY_IQR and not tight.noisy
    assert wide.relative_iqr > NOISY_IQR and wide.noisy
    assert Timing((10.0,) * (MIN_ROUNDS - 1)).noisy
    assert not Timing((10.0,) * MIN_ROUNDS).noisy


def test_speedup_pairs_rounds_so_a_drifting_machine_cancels_out():
    drift = (1.0, 8.0, 2.0, 30.0, 4.0, 16.0)  # the machine slows and recovers from round to round
    base, other = Timing(drift), Timing(tuple(d / 2 for d in drift))
    assert base.noisy and other.noisy
    ratio = speedup(base, other)
    assert isinstance(ratio, Ratio)
    assert ratio.samples == (2.0,) * 6 and ratio.median == 2.0 and ratio.iqr == 0.0 and not ratio.noisy
    shuffled = Timing((8.0, 1.0, 30.0, 2.0, 16.0, 4.0))  # same samples, rounds no longer paired
    assert speedup(shuffled, other).noisy


def test_speedup_refuses_timings_of_different_rounds():
    with pytest.raises(ValueError, match="same rounds"):
        speedup(Timing((1.0, 2.0)), Timing((1.0, 2.0, 3.0)))


def test_each_timed_call_follows_an_untimed_one_and_the_order_rotates():
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_rounds(runners, rounds=3, warmup=1)
    assert calls == [*"abc", *"aabbcc", *"bbccaa", *"ccaabb"]
    assert all(len(t.samples) == 3 for t in timings.values())


def test_two_identical_models_time_alike_when_paired():
    x = torch.randn(8, 1, 8, 8)
    runners = {name: torch_runner(mlp(), x, threads=1, device="cpu") for name in ("a", "b")}
    timings = time_rounds(runners, rounds=15, warmup=2)
    assert all(len(t.samples) == 15 and t.median > 0 for t in timings.values())
    # Loose on purpose: a loaded machine must not flake it; pairing keeps the ratio near 1.
    assert 0.5 < speedup(timings["a"], timings["b"]).median < 2.0


def test_the_thread_count_is_set_while_timing_and_restored_after():
    before = torch.get_num_threads()
    threads = before + 1
    run = torch_runner(mlp(), torch.randn(2, 1, 8, 8), threads=threads, device="cpu")
    seen: list[int] = []

    def spy() -> None:
        run()
        seen.append(torch.get_num_threads())

    time_rounds({"m": spy}, rounds=2, warmup=1)
    assert seen == [threads] * 5
    assert torch.get_num_threads() == before


def test_the_thread_count_and_the_collector_are_restored_when_a_runner_raises():
    before = torch.get_num_threads()
    run = torch_runner(mlp(), torch.randn(2, 1, 8, 8), threads=before + 1, device="cpu")
    calls = []

    def failing() -> None:
        run()
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("runner failed")

    with pytest.raises(RuntimeError, match="runner failed"):
        time_rounds({"m": failing}, rounds=5, warmup=1)
    assert torch.get_num_threads() == before
    assert gc.isenabled()


def test_latency_table_times_both_runtimes_at_every_batch_size(tmp_path):
    models = {"a": mlp(), "b": mlp()}
    example = torch.randn(3, 1, 8, 8)
    paths = {}
    for name, model in models.items():
        paths[name] = tmp_path / f"{name}.onnx"
        export_onnx(model, example, paths[name])
    table = latency_table(models, paths, example, batch_sizes=[1, 5], threads=1, rounds=3, warmup=1, device="cpu")
    assert set(table) == {"a", "b"}
    for row in table.values():
        assert set(row) == {"torch_b1", "onnx_b1", "torch_b5", "onnx_b5"}
        assert all(len(t.samples) == 3 for t in row.values())
    with pytest.raises(ValueError, match="one ONNX file per model"):
        latency_table(models, {"a": paths["a"]}, example, [1], 1, 1, 0, "cpu")


def test_batch_of_repeats_real_rows():
    example = torch.arange(3.0).view(3, 1)
    assert batch_of(example, 5).flatten().tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]


NOTHING = ["--data", "absent", "--models", "absent"]  # a check that misses fails on the data, not after timing


@pytest.mark.parametrize("script, args, message", [
    ("latency", ["--rounds", "0"], "latency.py: error: --rounds: expected whole numbers of at least 1, got 0"),
    ("latency", ["--device", "bogus", *NOTHING], "latency.py: error: --device bogus: "),
    ("latency", ["--device", "meta", *NOTHING], "latency.py: error: --device meta: expected cpu, cuda or "
                                                "cuda:<index>"),
    ("latency", ["--device", f"cuda:{torch.cuda.device_count()}", *NOTHING], "latency.py: error: --device cuda:"),
    ("latency", [*NOTHING, "--rounds", "1"], "error: absent/meta.json: cannot read JSON"),
    ("oracle", ["--repeats", "0"], "oracle.py: error: --repeats: expected a whole number of at least 1, got 0"),
    ("oracle", ["--model", "absent"], "error: absent/spec.json: cannot read JSON"),
    ("distill_labels", ["--fractions", "1.5"], "distill_labels.py: error: --fractions: expected label fractions in "
                                               "(0, 1], got [1.5]"),
    ("distill_labels", ["--threads", "0"], "distill_labels.py: error: --threads: expected whole numbers of at "
                                           "least 1, got 0"),
    ("distill_labels", ["--params", "absent.yaml"], "error: absent.yaml: cannot read: [Errno 2]"),
    ("iterative", ["--amount", "90"], "iterative.py: error: --amount: expected a fraction in [0, 1), got 90.0"),
    ("iterative", ["--steps", "4", "0"], "iterative.py: error: --steps: expected round counts in [1, 100], got [4, 0]"),
    ("rounding", ["--rounds", "0"], "rounding.py: error: --rounds: expected whole numbers of at least 1, got 0"),
    ("rounding", ["--params", "absent.yaml"], "error: absent.yaml: cannot read: [Errno 2]"),
])
def test_the_benches_refuse_a_bad_option_or_input_with_one_line_before_any_work(
        script, args, message, tmp_path, monkeypatch, capsys):
    """One line, exit 2, no traceback, each had done worse:
    - latency: a count that times nothing crashed torch after every model was loaded; a device that is not a
      CPU or GPU (meta) failed after the models were loaded, as would a cuda:<index> past the last GPU where
      there are GPUs;
    - the training benches: a percentage typed for an amount (or a fraction over 1) ran to the end on
      meaningless numbers, a count of 0 failed with a traceback, --steps 0 after a teacher and a student had
      trained;
    - a params file, data or model not there (no `dvc repro` yet) was a traceback.
    Their main() here, in the test's process: its imports are this process's already."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main()
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == "" and out.err.splitlines()[-1].startswith(message), out.err


@pytest.mark.slow
def test_the_mnist_bench_refuses_a_bad_override_before_any_seed(tmp_path):
    """One line naming the override, and no seed's work dir made (or kept) for it."""
    (tmp_path / "MNIST/raw").mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(REPO / "bench/mnist.py"), "--raw", str(tmp_path / "MNIST"), "-S",
                          "nosuch.key=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert len(out.stderr.splitlines()) == 1 and "nosuch" in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MNIST"]
