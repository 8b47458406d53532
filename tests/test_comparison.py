"""The evaluate stage's arithmetic on known values: ratios, paired speed-ups, per-class accuracy, the table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdprune import comparison, report
from kdprune.measure import Timing


TESTED = 100


def _results() -> tuple[dict, dict]:
    """Five models: the fine-tuned one a quarter of the student's MACs and twice as fast in every round."""
    base = {"teacher": (1000, 8000, 4.0), "student_scratch": (200, 1600, 2.0), "student": (200, 1600, 2.0),
            "pruned": (50, 400, 1.0), "finetuned": (50, 400, 1.0)}
    errors = {"teacher": 1, "student_scratch": 5, "student": 3, "pruned": 50, "finetuned": 4}  # of TESTED
    results = {n: {"accuracy": 1 - errors[n] / TESTED, "errors": errors[n], "params": p, "nonzero_params": p,
                   "macs": m} for n, (p, m, _) in base.items()}
    timings = {n: {f"{rt}_b{b}": Timing(tuple(ms * b * (1 + 0.1 * r) for r in range(5)))
                   for rt in ("torch", "onnx") for b in (1, 256)} for n, (_, _, ms) in base.items()}
    return results, timings


def test_ratios_against_the_teacher_and_the_student_and_the_distill_gain():
    results, timings = _results()
    comparison._ratios(results, timings, [1, 256], TESTED)
    f = results["finetuned"]
    assert f["params_vs_teacher"] == 0.05 and f["params_vs_student"] == 0.25 and f["macs_vs_student"] == 0.25
    assert f["accuracy_drop_vs_student"] == pytest.approx(0.01)
    assert f["speedup_b256_vs_student"] == pytest.approx(2.0) and f["speedup_iqr_b256_vs_student"] == pytest.approx(0)
    assert f["ort_speedup_b1_vs_teacher"] == pytest.approx(4.0)
    assert f["time_per_macs_b256"] == pytest.approx(0.5)  # 2x faster for 4x fewer MACs: half the cut became time
    assert results["student"]["distill_gain"] == pytest.approx(0.02)
    assert "params_vs_teacher" not in results["student"]  # no ratio of a reference against itself


def test_a_drop_of_exactly_the_allowed_drop_is_that_drop_exactly():
    """Accuracies were float32 means: 9,003 and 8,903 right of 10,000 made a drop of 0.010000050067901611,
    and the registry refused, as beyond evaluate.max_accuracy_drop 0.01, a model exactly at it."""
    results, timings = _results()
    y = torch.zeros(10_000, dtype=torch.long)
    for name, right in (("student", 9003), ("finetuned", 8903)):
        results[name] |= comparison.scored((torch.arange(10_000) >= right).long(), y)
    assert results["finetuned"]["accuracy"] == 0.8903
    comparison._ratios(results, timings, [1, 256], 10_000)
    assert results["finetuned"]["accuracy_drop_vs_student"] == 0.01


def test_per_class_accuracy_reads_the_confusion_matrix_rows():
    counts = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows: true class; an absent class scores 0
    assert comparison.per_class_accuracy(counts) == {"0": 0.75, "1": 1.0, "2": 0.0}


def test_the_headline_is_a_dozen_short_numbers_of_the_finetuned_model_and_the_references():
    results, timings = _results()
    for r in results.values():
        r.update(latency_ms_b256=1.0)
    comparison._ratios(results, timings, [1, 256], TESTED)
    headline = comparison.headline(results)
    assert len(headline) == 12 and headline["params_vs_teacher"] == 0.05 and headline["teacher_acc"] == 0.99


def test_the_table_says_noisy_instead_of_a_confident_figure_and_what_sparsity_buys():
    results, timings = _results()
    comparison._ratios(results, timings, [1, 256], TESTED)
    for name, r in results.items():
        r.update(errors=1, gzip_bytes=1000, latency_ms_b1=1.0, latency_noisy_b1=name == "pruned",
                 latency_ms_b256=2.0, latency_noisy_b256=False)
    results["pruned"]["nonzero_params"] = 10  # a masked model: most weights zero
    results["pruned"]["gzip_bytes"] = 300
    timing = SimpleNamespace(rounds=30, threads=1, device="cpu")
    table = report.comparison_table(results, timing, noisy_iqr=0.15)
    row = next(line for line in table.splitlines() if line.startswith("| pruned |"))
    assert "1 (noisy)" in row and "2.00x ±0.00" in row
    assert ("Latency: the median of 30 interleaved rounds at 1 thread on the cpu (ONNX Runtime: the cpu); a "
            "speed-up is paired round by round, ± half its interquartile range; (noisy): the rounds' "
            "interquartile range exceeds 15% of the median.") in table
    assert "pruned: 80% of its weights are zero" in table and "30% of the student's" in table
    assert "runs no faster" in table


def test_the_tradeoff_plot_labels_its_log_axes_in_plain_numbers(monkeypatch, tmp_path):
    """matplotlib's own log-axis labels are mathtext (10^4, 3x10^0): half the plot's drawing time, and hard
    to read; these are plain numbers, and a narrow range (latency) is labelled at its minor ticks."""
    assert [report.short(v) for v in (0.5, 300, 1000, 1500, 2e7, 3e9)] == ["0.5", "300", "1k", "1.5k", "20M", "3G"]
    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: figures.append(fig))
    results, _ = _results()
    for name, r in results.items():
        r["latency_ms_b256"] = {"teacher": 1.42, "pruned": 1.3}.get(name, 1.36)
        r["latency_ms_b1"] = 0.1  # not the largest batch: not plotted
    report.plot_tradeoff(results, tmp_path / "tradeoff.png")
    (fig,) = figures
    fig.canvas.draw()
    labels = {ax.get_xlabel(): {t.get_text() for minor in (False, True) for t in ax.get_xticklabels(minor=minor)}
              - {""} for ax in fig.axes}
    assert set(labels) == {"parameters", "MACs", "latency at batch 256, ms"}
    assert {"100", "1k"} <= labels["parameters"] and {"1k", "10k"} <= labels["MACs"]
    assert labels["latency at batch 256, ms"] and all("$" not in s for s in set().union(*labels.values())), labels
    import matplotlib.pyplot as plt

    plt.close(fig)  # _save_figure, which closes it, was replaced
