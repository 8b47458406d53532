"""soft_labels: the teacher's logits on the train split, with the hashes of the files they came from.

Logits, not probabilities: the temperature is applied where they are used.
"""

from kdprune import sharing, stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "teacher", "out").parse_args(argv)
    load_params(args.params)
    from kdprune import soft_labels
    from kdprune.checkpoints import load_model
    from kdprune.data import load_split
    from kdprune.files import staged_dir
    from kdprune.tracking import log_epoch, stage_run, write_run_record
    from kdprune.training import predict

    teacher, _ = load_model(args.teacher)
    x, y = load_split(args.data, "train")
    with stage_run("soft_labels", {}, inputs=[args.data, args.teacher]) as run, staged_dir(args.out) as out:
        logits = predict(teacher, x)  # (N, K)
        soft_labels.save(out, logits, args.teacher, args.data)
        write_run_record(out, run)
        log_epoch(0, {"teacher_train_accuracy": (logits.argmax(1) == y).float().mean().item()})


if __name__ == "__main__":
    stage.guard(sharing.once(main))
