"""evaluate: every model side by side on the test split, and the MLflow summary run of this pipeline."""

from kdprune import stage
from kdprune.params import load_params

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
    print(table)


if __name__ == "__main__":
    stage.guard(main)
