"""Tables and plots: the side-by-side comparison of every model, and criteria against the oracle."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

from kdprune.files import write_atomic


def count(n: float) -> str:
    """Integers with thousands separators: 9,272."""
    return f"{int(round(n)):,}"


def ms(t: float) -> str:
    """Milliseconds to three significant figures: 0.412, 4.18, 41.8."""
    return f"{t:.3g}" if t < 100 else f"{t:,.0f}"


def ratio(r: float) -> str:
    return f"{r:.3f}"


def times(r: float) -> str:
    return f"{r:.2f}x"


def _timing(m: dict[str, Any], key: str) -> str:
    """A latency, or `noisy` beside it when its rounds spread too wide to trust."""
    if key not in m:
        return ""
    noisy = m.get(key.replace("_ms_", "_noisy_"), False)
    return ms(m[key]) + (" (noisy)" if noisy else "")


def _speedup(m: dict[str, Any], key: str) -> str:
    """A paired speed-up with its interquartile range, or `noisy` when the rounds disagree."""
    if key not in m:
        return ""
    iqr = m.get(key.replace("speedup_", "speedup_iqr_"), 0.0)
    noisy = m.get(key.replace("speedup_", "speedup_noisy_"), False)
    return f"{times(m[key])} ±{iqr / 2:.2f}" + (" (noisy)" if noisy else "")


COLUMNS: list[tuple[str, str, Callable[[dict[str, Any], str], str]]] = [
    ("accuracy", "accuracy", lambda m, k: f"{m[k]:.4f}"),
    ("errors", "errors", lambda m, k: count(m[k])),
    ("params", "params", lambda m, k: count(m[k])),
    ("nonzero_params", "non-zero", lambda m, k: count(m[k])),
    ("macs", "MACs", lambda m, k: count(m[k])),
    ("onnx_bytes", "ONNX bytes", lambda m, k: count(m[k])),
    ("gzip_bytes", "model.pt gzip", lambda m, k: count(m[k])),
    ("latency_ms_b1", "ms @1", _timing),
    ("latency_ms_b256", "ms @256", _timing),
    ("ort_latency_ms_b256", "ORT ms @256", _timing),
    ("params_vs_teacher", "params/teacher", lambda m, k: ratio(m[k])),
    ("speedup_b256_vs_student", "speed-up @256 vs student", _speedup),
    ("ort_speedup_b256_vs_student", "ORT speed-up @256", _speedup),
    ("time_per_macs_b256", "MACs cut -> time", lambda m, k: ratio(m[k])),
]


def headline_line(models: dict[str, dict[str, Any]]) -> str:
    """The fine-tuned model in one sentence: what the summary run's description opens with."""
    f = models["finetuned"]
    return (f"fine-tuned: accuracy {f['accuracy']:.4f} ({-f['accuracy_drop_vs_student']:+.4f} against the student), "
            f"{f['params_vs_teacher']:.1%} of the teacher's parameters, {times(f['speedup_b256_vs_student'])} the "
            f"student's speed at batch 256 in PyTorch, {times(f['ort_speedup_b256_vs_student'])} in ONNX Runtime")


def comparison_table(models: dict[str, dict[str, Any]], timing: Any, noisy_iqr: float) -> str:
    """Markdown: one row per model, one column per headline figure (blank where a ratio does not apply),
    how the latencies were measured (`timing`: the params' evaluate section) and what ± and (noisy: a
    relative IQR over `noisy_iqr`) mean, then what unstructured sparsity does and does not buy, when a
    model is masked."""
    cols = [c for c in COLUMNS if any(c[0] in m for m in models.values())]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in models.items():
        cells = [fmt(m, key) if key in m else "" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nLatency: the median of {timing.rounds} interleaved rounds at {timing.threads} "
                 f"thread{'s' if timing.threads > 1 else ''} on the {timing.device} (ONNX Runtime: the cpu); "
                 f"a speed-up is paired round by round, ± half its interquartile range; (noisy): the rounds' "
                 f"interquartile range exceeds {noisy_iqr:.0%} of the median.")
    return "\n".join(lines + _sparsity_notes(models)) + "\n"


def _sparsity_notes(models: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    for name, m in models.items():
        if m["nonzero_params"] < 0.95 * m["params"] and "student" in models:
            zero = 1 - m["nonzero_params"] / m["params"]
            gz = m["gzip_bytes"] / models["student"]["gzip_bytes"]
            notes.append(f"\n{name}: {zero:.0%} of its weights are zero (masked, not removed): gzip shrinks its "
                         f"model.pt to {gz:.0%} of the student's, but dense kernels (PyTorch, ONNX Runtime) "
                         f"still multiply the zeros, so it runs no faster than a model of its shape.")
    return notes


def figure_png(fig: Any) -> bytes:
    """The figure as PNG bytes, and closed (no Software tag: the same figure gives the same bytes)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _save_figure(fig: Any, path: Path) -> None:
    write_atomic(path, figure_png(fig))


def short(v: float) -> str:
    """A tick label in plain text: 300, 1.5k, 20M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= size:
            return f"{v / size:g}{suffix}"
    return f"{v:g}"


def _plain_log_axis(axis: Any) -> None:
    """Log-scale ticks labelled `short`, where matplotlib's default would typeset each label as mathtext
    (10^4, 3x10^0): half the time of drawing the trade-off plot, and easier to read."""
    from matplotlib.ticker import LogFormatter

    class Short(LogFormatter):  # LogFormatter still picks which minor ticks get a label
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return short(x)

    axis.set_major_formatter(Short())
    axis.set_minor_formatter(Short(labelOnlyBase=False))


def plot_tradeoff(models: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against params, MACs and latency at the largest batch, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(int(k.rsplit("b", 1)[1]) for k in next(iter(models.values())) if k.startswith("latency_ms_b"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    costs = {"params": "parameters", "macs": "MACs", f"latency_ms_b{batch}": f"latency at batch {batch}, ms"}
    for ax, (key, label) in zip(axes, costs.items()):
        for name, m in models.items():
            ax.scatter(m[key], m["accuracy"], s=40)
            ax.annotate(name, (m[key], m["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("accuracy against cost")
    _save_figure(fig, path)


def plot_confusion(matrices: dict[str, Any], path: Path) -> None:
    """One confusion matrix per model (rows: true class, columns: predicted), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one row of class labels for all: the panels share their classes
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.2), squeeze=False, sharey=True)
    for ax, (name, counts) in zip(axes[0], matrices.items()):
        ax.imshow(counts.numpy(), cmap="Blues")
        k = len(counts)
        for i, row in enumerate(counts.tolist()):
            for j, n in enumerate(row):
                if n and i != j:  # only the mistakes: the diagonal is read off the colour
                    ax.text(j, i, n, ha="center", va="center", fontsize=7, color="red")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("true", fontsize=8)
    _save_figure(fig, path)


def plot_pruning(before: dict[str, int], after: dict[str, int], curves: dict[str, list[float]] | None,
                 fractions: tuple[float, ...], path: Path) -> None:
    """Units kept per layer (of how many), and, when measured, each layer's sensitivity curve:
    validation accuracy against the fraction of that layer's units pruned alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 6, 4), squeeze=False)
    ax = axes[0][0]
    names = list(before)
    ax.barh(names, [before[n] for n in names], color="lightgrey", label="student")
    ax.barh(names, [after[n] for n in names], color="tab:blue", label="pruned")
    ax.invert_yaxis()
    ax.set_xlabel("units")
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title("units kept per layer")
    if curves:
        ax = axes[0][1]
        for name, curve in curves.items():
            ax.plot(fractions, curve, marker="o", ms=3, label=name)
        ax.set_xlabel("fraction of the layer's units pruned (alone)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title("layer sensitivity")
    _save_figure(fig, path)


def plot_criteria(unit_scores: dict[str, dict[str, Any]], path: Path) -> None:
    """Without an oracle: how the criteria rank the units against each other (Spearman, all units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from scipy.stats import spearmanr

    names = list(unit_scores)
    keys = list(next(iter(unit_scores.values())))
    flat = [torch.cat([unit_scores[m][k].flatten() for k in keys]).numpy() for m in names]
    rho = [[float(spearmanr(a, b).statistic) if len(names) > 1 else 1.0 for b in flat] for a in flat]
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(names), 0.8 + 0.7 * len(names)))
    ax.imshow(rho, vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{rho[i][j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title("criteria against each other (Spearman; score.oracle is off)", fontsize=8)
    _save_figure(fig, path)


def plot_oracle(unit_scores: dict[str, dict[str, Any]], truth: dict[str, Any], path: Path) -> None:
    """Each criterion's unit ranks against the ranks of the true loss change of removing the unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from scipy.stats import rankdata

    t = rankdata(torch.cat([truth[k] for k in truth]).numpy())
    n = len(unit_scores)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    # every panel ranks the same units: shared axes, one set of rank labels per row and column
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, (method, scores) in zip(axes.flat, unit_scores.items()):
        s = rankdata(torch.cat([scores[k] for k in truth]).numpy())
        ax.scatter(t, s, s=6, alpha=0.6)
        ax.set_title(method, fontsize=9)
    for i in range(n, rows * cols):
        axes.flat[i].axis("off")
    for column in range(cols):
        lowest = axes.flat[max(range(column, n, cols))]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("oracle rank", fontsize=8)
    for row in axes:
        row[0].set_ylabel("criterion rank", fontsize=8)
    fig.suptitle("criterion rank vs true loss-change rank (per unit)")
    _save_figure(fig, path)
