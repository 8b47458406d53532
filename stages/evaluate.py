"""evaluate: every model side by side on the test split, and the MLflow summary run of this pipeline."""

from __future__ import annotations

from pathlib import Path

from kdprune import stage
from kdprune.params import Params, load_params

MODELS = ("teacher", "student_scratch", "student", "pruned", "finetuned")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", *MODELS, "metrics", "per_class", "report", "plot",
                        "confusion").parse_args(argv)
    p = load_params(args.params)
    from kdprune.checkpoints import load_model
    from kdprune.data import load_meta, load_split
    from kdprune.files import write_atomic, write_json
    from kdprune.evaluation import compare, confusion, per_class_accuracy
    from kdprune.params import flatten
    from kdprune.report import comparison_table, plot_confusion, plot_tradeoff
    from kdprune.tracking import log_epoch, stage_run, summary_run

    dirs = {name: getattr(args, name) for name in MODELS}
    models = {name: load_model(d)[0] for name, d in dirs.items()}
    x, y = load_split(args.data, "test")
    with stage_run("evaluate", stage.section(p, "evaluate"), inputs=[args.data, *dirs.values()]) as run:
        results = compare(models, dirs, x, y, p.evaluate)
        table = comparison_table(results)
        write_json(args.metrics, results)
        write_atomic(args.report, table)
        plot_tradeoff(results, args.plot)
        num_classes = load_meta(args.data)["num_classes"]
        matrices = {name: confusion(m, x, y, num_classes) for name, m in models.items()}
        write_json(args.per_class, {name: per_class_accuracy(c) for name, c in matrices.items()})
        plot_confusion(matrices, args.confusion)
        headline = {f"{m}.{k}": v for m, r in results.items() for k, v in r.items()}
        log_epoch(0, headline)
        summary_run(flatten(p), headline, {**run.upstream, "evaluate": run.run_id},
                    [args.metrics, args.per_class, args.report, args.plot, args.confusion])
        verdict = register(p, results["finetuned"], args.finetuned)
    print(table)
    print(verdict)


def register(p: Params, finetuned: dict, finetuned_dir: Path) -> str:
    """Register the fine-tuned model when its accuracy drop against the student is within bounds."""
    from kdprune.files import RUN_FILE, read_json
    from kdprune.tracking import register_model

    name = f"kdprune-{p.data.name}" if p.evaluate.registered_model == "auto" else p.evaluate.registered_model
    drop, limit = finetuned["accuracy_drop_vs_student"], p.evaluate.max_accuracy_drop
    if drop > limit:
        return (f"not registered in {name}: accuracy drop against the student {drop:.4f} "
                f"exceeds evaluate.max_accuracy_drop {limit}")
    keys = ("accuracy", "accuracy_drop_vs_student", "params_vs_student", "params_vs_teacher", "macs_vs_student",
            "speedup_b256_vs_student")
    tags = {k: round(finetuned[k], 6) for k in keys if k in finetuned}
    version = register_model(read_json(finetuned_dir / RUN_FILE)["model_uri"], name, tags)
    return f"registered the fine-tuned model as {name} version {version}"


if __name__ == "__main__":
    stage.guard(main)
