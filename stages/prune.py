"""prune: remove the student's least important units (structured) or zero its weights (unstructured)."""

from kdprune import sharing, stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "student", "scores", "out", "plot").parse_args(argv)
    p = load_params(args.params)
    from kdprune.checkpoints import load_model, load_tensors, save_model, save_tensors
    from kdprune.data import load_split
    from kdprune.errors import CheckpointError
    from kdprune.files import staged_dir
    from kdprune.importance import from_tensors
    from kdprune.models import count_params
    from kdprune.files import write_atomic
    from kdprune.pruning import FRACTIONS, ScoresMismatch, iterative_prune, sensitivity
    from kdprune.rounds import recoverer, rescorer
    from kdprune.report import plot_sensitivity, sensitivity_csv
    from kdprune.tracking import log_artifact, log_epoch, stage_run, write_run_record
    from kdprune.training import evaluate

    model, spec = load_model(args.student)
    scores_file = args.scores / f"{p.prune.criterion}.pt"
    scores = from_tensors(load_tensors(scores_file))
    train, (x_val, y_val) = load_split(args.data, "train"), load_split(args.data, "val")
    accuracy = lambda m: evaluate(m, x_val, y_val)["accuracy"]  # noqa: E731
    before = accuracy(model)
    logged = stage.section(p, "prune", "seed", "device", "score.samples", "score.batch_size", "score.probes",
                           "student.label_fraction", "finetune.batch_size")
    with stage_run("prune", logged, inputs=[args.data, args.student, args.scores]) as run, \
            staged_dir(args.out) as out:
        try:
            curves = sensitivity(model, scores.units, accuracy)
            masks = iterative_prune(model, rescorer(p, train, scores), p.prune.amount, p.prune.steps,
                                    p.prune.scope, p.prune.structured, x_val[:1],
                                    recoverer(p, train, (x_val, y_val)), accuracy)
        except ScoresMismatch as e:
            raise CheckpointError(f"{scores_file}: {e}") from e
        write_atomic(out / "sensitivity.csv", sensitivity_csv(curves, FRACTIONS))
        plot_sensitivity(curves, FRACTIONS, args.plot)
        save_model(out, model, spec)
        if masks is not None:
            save_tensors(out / "masks.pt", masks)
        write_run_record(out, run)
        log_epoch(0, {"val_accuracy_before": before, "val_accuracy": accuracy(model), "params": count_params(model)})
        log_artifact(args.plot)


if __name__ == "__main__":
    stage.guard(sharing.once(main))
