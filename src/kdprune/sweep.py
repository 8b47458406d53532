"""`kdprune report`: summary runs of a sweep, grouped over seeds, as a table and a Pareto plot."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from kdprune.files import write_atomic

# What "which compression should I ship?" is decided on: the fine-tuned model's quality and costs.
HEADLINE = ("finetuned.accuracy", "finetuned.params", "finetuned.macs", "finetuned.latency_ms_b256",
            "finetuned.params_vs_student", "finetuned.accuracy_drop_vs_student", "student.distill_gain")
COSTS = ("params", "macs", "latency_ms_b256")
REFERENCES = ("teacher", "student")


def summary_runs(experiment: str) -> list[Any]:
    """Every finished summary run of `experiment` in the configured tracking store."""
    from mlflow import MlflowClient

    from kdprune.errors import TrackingError
    from kdprune.tracking import check_reachable, tracking_uri

    uri = tracking_uri()
    check_reachable(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"{uri} has no experiment {experiment!r}: run the pipeline first")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'summary' and "
                                  "attributes.status = 'FINISHED'", max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def group(runs: list[Any], metrics: tuple[str, ...] = HEADLINE) -> list[dict[str, Any]]:
    """One row per distinct setting of every param except `seed`: mean, std and n of each metric.

    Rows carry only the params that differ between rows (the swept ones), so the table reads as
    the sweep; std is the sample standard deviation (0 for a single run).
    """
    groups: dict[tuple, list[Any]] = {}
    for r in runs:
        key = tuple(sorted((k, v) for k, v in r.data.params.items() if k != "seed"))
        groups.setdefault(key, []).append(r)
    varying = sorted({k for key in groups for k, v in key if len({dict(g).get(k) for g in groups}) > 1})
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = {k: dict(key).get(k) for k in varying}
        row["n"] = len(members)
        row["seeds"] = " ".join(sorted(r.data.params.get("seed", "?") for r in members))
        for m in metrics + tuple(f"{ref}.{c}" for ref in REFERENCES for c in ("accuracy", *COSTS)):
            values = [r.data.metrics[m] for r in members if m in r.data.metrics]
            if values:
                row[f"{m}.mean"] = statistics.fmean(values)
                row[f"{m}.std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: [str(r[k]) for k in varying])


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: swept params, n, and `mean ± std` of each headline metric."""
    swept = [k for k in rows[0] if not k.endswith((".mean", ".std")) and k not in ("n", "seeds")] if rows else []
    shown = [m for m in HEADLINE if any(f"{m}.mean" in r for r in rows)]
    lines = ["| " + " | ".join([*swept, "n", *shown]) + " |", "|" + "---|" * (len(swept) + 1 + len(shown))]
    for r in rows:
        cells = [str(r[k]) for k in swept] + [str(r["n"])]
        cells += [_pm(r, m) for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm(row: dict[str, Any], metric: str) -> str:
    if f"{metric}.mean" not in row:
        return ""
    mean, std = row[f"{metric}.mean"], row[f"{metric}.std"]
    return f"{mean:.4g} ± {std:.2g}"


def to_csv(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower cost and higher accuracy, (cost, accuracy)."""
    return [i for i, (c, a) in enumerate(points)
            if not any(c2 <= c and a2 >= a and (c2, a2) != (c, a) for c2, a2 in points)]


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against params, MACs and latency; error bars are one std over seeds; front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdprune.report import _save_figure

    swept = [k for k in rows[0] if not k.endswith((".mean", ".std")) and k not in ("n", "seeds")]
    fig, axes = plt.subplots(1, len(COSTS), figsize=(5 * len(COSTS), 4.2), sharey=True)
    for ax, cost in zip(axes, COSTS):
        pts = [(r[f"finetuned.{cost}.mean"], r["finetuned.accuracy.mean"]) for r in rows]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[r["finetuned.accuracy.std"] for r in rows],
                    xerr=[r[f"finetuned.{cost}.std"] for r in rows], fmt="o", ms=5, capsize=3, label="fine-tuned")
        front = sorted((pts[i] for i in pareto_front(pts)))
        ax.plot([p[0] for p in front], [p[1] for p in front], "r--", lw=1, label="Pareto front")
        for r, (x, y) in zip(rows, pts):
            ax.annotate(", ".join(f"{k.split('.')[-1]}={r[k]}" for k in swept), (x, y), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        for ref, marker in zip(REFERENCES, ("*", "s")):
            xs = [r[f"{ref}.{cost}.mean"] for r in rows if f"{ref}.{cost}.mean" in r]
            ys = [r[f"{ref}.accuracy.mean"] for r in rows if f"{ref}.accuracy.mean" in r]
            if xs:
                ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], marker=marker, s=90, label=ref)
        ax.set_xscale("log")
        ax.set_xlabel(cost)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle("fine-tuned models of the sweep: accuracy against cost (mean ± std over seeds)")
    _save_figure(fig, path)


def write_report(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    paths = [out / "sweep.md", out / "sweep.csv", out / "pareto.png"]
    write_atomic(paths[0], table(rows))
    write_atomic(paths[1], to_csv(rows))
    plot_pareto(rows, paths[2])
    return paths
