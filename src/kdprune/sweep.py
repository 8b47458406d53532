"""`kdprune report`: summary runs of a sweep, grouped over seeds, as a table and a Pareto plot."""

from __future__ import annotations

import csv
import errno
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
    from kdprune.errors import TrackingError
    from kdprune.store import find_experiment, named_errors, tracking_uri

    client, exp = find_experiment(experiment)
    uri = tracking_uri()
    if exp is None:
        raise TrackingError(f"{uri} has no experiment {experiment!r}: run the pipeline first")
    with named_errors(uri):
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
    the sweep; std is the sample standard deviation, None for a single run (there is no spread). A
    setting run again with the same seed (evaluate is never cached: another `dvc exp run` of it, or a
    code change evaluate depends on) counts once, by its latest summary run: n counts seeds, not runs.
    """
    latest: dict[tuple, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        latest[tuple(sorted(r.data.params.items()))] = r
    groups: dict[tuple, list[Any]] = {}
    for r in latest.values():
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
                row[f"{m}.std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return sorted(rows, key=lambda r: [_in_order(r[k]) for k in varying])


def _in_order(value: str | None) -> tuple[int, float, str]:
    """A param's logged text as it sorts: numbers by value (5 before 10), then text, then absent."""
    if value is None:
        return 2, 0.0, ""
    try:
        return 0, float(value), value
    except ValueError:
        return 1, 0.0, value


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: swept params, n (the seeds behind each row), and each headline metric as `mean ± std`
    over those seeds (the mean alone where n = 1)."""
    swept = [k for k in rows[0] if not k.endswith((".mean", ".std")) and k not in ("n", "seeds")] if rows else []
    shown = [m for m in HEADLINE if any(f"{m}.mean" in r for r in rows)]
    lines = ["| " + " | ".join([*swept, "n", *shown]) + " |", "|" + "---|" * (len(swept) + 1 + len(shown))]
    for r in rows:
        cells = [str(r[k]) for k in swept] + [str(r["n"])]
        cells += [_pm(r, m) for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm(row: dict[str, Any], metric: str) -> str:
    """`mean ± std` over seeds in the metric's own format; the mean alone for one run (no spread to show)."""
    if f"{metric}.mean" not in row:
        return ""
    fmt = _FORMATS.get(metric.rsplit(".", 1)[1], lambda v: f"{v:.4f}")
    mean, std = row[f"{metric}.mean"], row[f"{metric}.std"]
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


_FORMATS = {"params": lambda v: f"{v:,.0f}", "macs": lambda v: f"{v:,.0f}", "latency_ms_b256": lambda v: f"{v:.3g}"}


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


def plot_pareto(rows: list[dict[str, Any]]) -> bytes:
    """Accuracy against params, MACs and latency, as a PNG; error bars are one std over seeds; front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdprune.report import figure_png

    swept = [k for k in rows[0] if not k.endswith((".mean", ".std")) and k not in ("n", "seeds")]
    fig, axes = plt.subplots(1, len(COSTS), figsize=(5 * len(COSTS), 4.2), sharey=True)
    for ax, cost in zip(axes, COSTS):
        pts = [(r[f"finetuned.{cost}.mean"], r["finetuned.accuracy.mean"]) for r in rows]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[r["finetuned.accuracy.std"] or 0 for r in rows],
                    xerr=[r[f"finetuned.{cost}.std"] or 0 for r in rows], fmt="o", ms=5, capsize=3, label="fine-tuned")
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
    return figure_png(fig)


REPORT = ("sweep.md", "sweep.csv", "pareto.png")


def check_out(out: Path) -> None:
    """Before the store is read: `out` is a folder, or not there yet, and none of the report's files in it
    a folder (an OSError naming the path)."""
    found = next((folder for folder in (out, *out.absolute().parents) if folder.exists()), None)
    if found is not None and not found.is_dir():  # `out`, or a file where one of its folders would be
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(found))
    for name in REPORT:
        if (out / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, "a folder, where the report writes a file", str(out / name))


def write_report(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The table, the CSV and the Pareto plot, all made before the first is written (each atomically)."""
    made = dict(zip((out / name for name in REPORT), (table(rows), to_csv(rows), plot_pareto(rows))))
    check_out(out)
    for path, data in made.items():
        write_atomic(path, data)
    return list(made)


def champions(runs: list[Any]) -> list[str]:
    """One line per registered model the sweep's runs register into: which version `champion` names."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from kdprune.registry import model_name
    from kdprune.store import tracking_uri

    client = MlflowClient(tracking_uri())
    names = sorted({model_name(r.data.params.get("evaluate.registered_model", "auto"),
                               r.data.params.get("data.name", "digits")) for r in runs})
    lines = []
    for name in names:
        try:
            v = client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            lines.append(f"{name}: no champion yet (no version kept its accuracy within evaluate.max_accuracy_drop)")
            continue
        t = v.tags  # the size the champion was chosen by (registry._crown): non-zero params, where tagged
        size = t.get("nonzero_params_vs_teacher", t.get("params_vs_teacher", "nan"))
        lines.append(f"{name}@champion: version {v.version}, accuracy {float(t.get('accuracy', 'nan')):.4f}, "
                     f"non-zero params/teacher {float(size):.3f}, from summary run {v.run_id}")
    return lines


def log_report(experiment: str, n_runs: int, paths: list[Path]) -> None:
    """The report as an MLflow run of its own (kind `report`), in the experiment it reports on."""
    import mlflow

    from kdprune.errors import TrackingError
    from kdprune.store import named_errors, tracking_uri

    uri = tracking_uri()
    with named_errors(uri):  # the store, or its artifact store, that took the query but not the run
        mlflow.set_tracking_uri(uri)
        exp = mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
        if exp is None:  # its runs were read moments ago
            raise TrackingError(f"{uri} has no experiment {experiment!r} any more: the report is not logged")
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"report of {n_runs} summary runs",
                              tags={"pipeline.kind": "report"}):
            mlflow.log_params({"experiment": experiment, "runs": n_runs})
            for p in paths:
                mlflow.log_artifact(str(p))
