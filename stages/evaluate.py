"""evaluate: every model side by side on the test split, and the MLflow summary run of this pipeline.

Accuracy from one prediction pass per model; its ONNX export checked against PyTorch on the whole
test split; latency in eager PyTorch and ONNX Runtime, in interleaved rounds, with its spread.
"""

from __future__ import annotations

from kdprune import stage
from kdprune.params import load_params

MODELS = ("teacher", "student_scratch", "student", "pruned", "finetuned")
READS = ("params.yaml",)  # the summary run carries every param


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", *MODELS, "headline", "metrics", "per_class", "report", "plot",
                        "confusion").parse_args(argv)
    p = load_params(args.params)
    dirs = {name: getattr(args, name) for name in MODELS}
    outputs = {path: "file" for path in (args.headline, args.metrics, args.per_class, args.report, args.plot,
                                         args.confusion)}
    with stage.run("evaluate", p, (), {"data": args.data, **dirs}, outputs, kind="summary",
                   title=stage.label(p)) as run:
        from kdprune import comparison, recipes, report
        from kdprune.checkpoints import load_model
        from kdprune.files import staged, write_atomic, write_json
        from kdprune.measure import NOISY_IQR
        from kdprune.training import resolve_device

        meta, norm, (test,) = recipes.load_data(args.data, "test")
        device = resolve_device(p.device)
        models = {name: load_model(d)[0].to(device) for name, d in dirs.items()}
        results, matrices = comparison.measure(models, dirs, test, norm, p.evaluate, meta["num_classes"])
        table = report.comparison_table(results, p.evaluate, NOISY_IQR)
        summary = comparison.pick(results, comparison.SUMMARY)
        headline = report.headline_line(results)  # opens the summary run's description, describes the version
        with staged(outputs) as new:  # in place once the summary run has them and the registry has answered
            write_json(new[args.headline], comparison.headline(results))
            write_json(new[args.metrics], results)
            write_json(new[args.per_class], {n: comparison.per_class_accuracy(c) for n, c in matrices.items()})
            write_atomic(new[args.report], table)
            report.plot_tradeoff(results, new[args.plot])
            report.plot_confusion(matrices, new[args.confusion])
            info = run.tracker.call("summarise", metrics={f"{m}.{k}": v for m, d in summary.items()
                                                          for k, v in d.items()},
                                    artifacts=[str(path.resolve()) for path in new.values()], table=table,
                                    headline=headline)
            verdict = run.tracker.call("register", name=registry_name(p), finetuned=run.inputs["finetuned"],
                                       metrics=results["finetuned"], max_drop=p.evaluate.max_accuracy_drop,
                                       description=headline)
    print(f"wrote {args.report} (make repro prints it)" + (f"; {verdict}" if verdict else ""))
    if info:
        from kdprune.summary import ui_links

        print(ui_links(info))


def registry_name(p) -> str:
    from kdprune.registry import model_name

    return model_name(p.evaluate.registered_model, p.data.name)


if __name__ == "__main__":
    stage.guard(main)
