"""prune: remove the student's least important units (structured) or zero its weights (unstructured)."""

from kdprune import manifest, stage
from kdprune.files import staged
from kdprune.params import load_params

READS = ("seed", "threads", "device", "prune", "score.samples", "score.batch_size", "score.probes",
         "student.label_fraction")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "student", "scores", "out", "plot").parse_args(argv)
    p = load_params(args.params)
    inputs = {"data": args.data, "student": args.student, "scores": args.scores}
    outputs = {args.out: "folder", args.plot: "file"}
    with stage.run("prune", p, READS, inputs, outputs) as run:
        for role in ("student", "data"):  # scores rank the units of one student, measured on one data
            manifest.check_made_from(args.scores, role, inputs[role], run.inputs[role])
        from kdprune import rounds as work
        from kdprune import recipes
        from kdprune.checkpoints import load_model
        from kdprune.training import resolve_device

        meta, norm, (train, val) = recipes.load_data(args.data, "train", "val")
        model, spec = load_model(args.student)
        model.to(resolve_device(p.device))
        result = work.prune_student(model, train, val, norm, args.scores, p)
        with staged(outputs) as new:
            work.save(new[args.out], model, spec, result, val, norm, run)
            work.plot(result, new[args.plot])
            run.log_epoch(0, result.metrics)
            run.log_artifact(new[args.plot])
            run.seal(new[args.out])


if __name__ == "__main__":
    stage.guard(main)
