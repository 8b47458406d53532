"""prune: remove the student's least important units (structured) or zero its weights (unstructured)."""

from kdprune import stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "student", "scores", "out").parse_args(argv)
    p = load_params(args.params)
    from kdprune.checkpoints import load_model, load_tensors, save_model, save_tensors
    from kdprune.errors import CheckpointError
    from kdprune.files import staged_dir
    from kdprune.data import load_split
    from kdprune.importance import from_tensors
    from kdprune.models import count_params
    from kdprune.pruning import prune
    from kdprune.tracking import log_epoch, stage_run, write_run_record
    from kdprune.training import evaluate

    model, spec = load_model(args.student)
    scores_file = args.scores / f"{p.prune.criterion}.pt"
    scores = from_tensors(load_tensors(scores_file))
    x_val, y_val = load_split(args.data, "val")
    before = evaluate(model, x_val, y_val)["accuracy"]
    with stage_run("prune", stage.section(p, "prune"), inputs=[args.data, args.student, args.scores]) as run, \
            staged_dir(args.out) as out:
        try:
            masks = prune(model, scores.units, scores.weights, p.prune.amount, p.prune.scope,
                          p.prune.structured, x_val[:1])
        except ValueError as e:
            raise CheckpointError(f"{scores_file}: {e}") from e
        save_model(out, model, spec)
        if masks is not None:
            save_tensors(out / "masks.pt", masks)
        write_run_record(out, run)
        log_epoch(0, {"val_accuracy_before": before, "val_accuracy": evaluate(model, x_val, y_val)["accuracy"],
                      "params": count_params(model)})


if __name__ == "__main__":
    stage.guard(main)
