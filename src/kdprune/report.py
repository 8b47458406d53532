"""Tables and plots: the side-by-side comparison of every model, and criteria against the oracle."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from kdprune.files import write_atomic

COLUMNS = [("accuracy", "accuracy", "{:.4f}"), ("params", "params", "{:,}"), ("nonzero_params", "non-zero", "{:,}"),
           ("macs", "MACs", "{:,}"), ("size_bytes", "bytes", "{:,}"), ("latency_ms_b1", "ms @1", "{:.3f}"),
           ("latency_ms_b256", "ms @256", "{:.3f}"), ("params_vs_teacher", "params/teacher", "{:.3f}"),
           ("params_vs_student", "params/student", "{:.3f}"), ("speedup_b256_vs_student", "speed-up @256", "{:.2f}x")]


def comparison_table(models: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model, one column per headline metric; blank where a ratio does not apply."""
    cols = [c for c in COLUMNS if any(c[0] in m for m in models.values())]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in models.items():
        cells = [fmt.format(m[key]) if key in m else "" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def plot_tradeoff(models: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against params, MACs and latency at the largest batch, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = max((k for k in next(iter(models.values())) if k.startswith("latency_ms_b")),
              key=lambda k: int(k.rsplit("b", 1)[1]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, key in zip(axes, ["params", "macs", lat]):
        for name, m in models.items():
            ax.scatter(m[key], m["accuracy"], s=40)
            ax.annotate(name, (m[key], m["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("accuracy against cost")
    _save_figure(fig, path)


def plot_confusion(matrices: dict[str, Any], path: Path) -> None:
    """One confusion matrix per model (rows: true class, columns: predicted), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.2), squeeze=False)
    for ax, (name, counts) in zip(axes[0], matrices.items()):
        ax.imshow(counts.numpy(), cmap="Blues")
        k = len(counts)
        for i in range(k):
            for j in range(k):
                if counts[i, j] and i != j:  # only the mistakes: the diagonal is read off the colour
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color="red")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("true", fontsize=8)
    _save_figure(fig, path)


def plot_sensitivity(curves: dict[str, list[float]], fractions: tuple[float, ...], path: Path) -> None:
    """Validation accuracy against the fraction of one layer's units pruned, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(fractions, curve, marker="o", ms=3, label=name)
    ax.set_xlabel("fraction of the layer's units pruned (alone)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("layer sensitivity")
    _save_figure(fig, path)


def sensitivity_csv(curves: dict[str, list[float]], fractions: tuple[float, ...]) -> str:
    rows = ["fraction," + ",".join(curves)]
    rows += [f"{f}," + ",".join(f"{c[i]:.6f}" for c in curves.values()) for i, f in enumerate(fractions)]
    return "\n".join(rows) + "\n"


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
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax, (method, scores) in zip(axes.flat, unit_scores.items()):
        s = rankdata(torch.cat([scores[k] for k in truth]).numpy())
        ax.scatter(t, s, s=6, alpha=0.6)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("oracle rank", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("criterion rank vs true loss-change rank (per unit)")
    _save_figure(fig, path)
