"""soft_labels: the teacher's logits on the train split, recorded as made from that teacher and split.

Logits, not probabilities: the temperature is applied where they are used.
"""

from kdprune import stage
from kdprune.files import staged_dir
from kdprune.params import load_params

READS = ("threads", "device")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "teacher", "out").parse_args(argv)
    p = load_params(args.params)
    inputs = {"data": args.data, "teacher": args.teacher}
    with stage.run("soft_labels", p, READS, inputs, outputs={args.out: "folder"}) as run:
        from kdprune import recipes, soft_labels
        from kdprune.checkpoints import load_model
        from kdprune.inference import predict
        from kdprune.training import resolve_device

        _, norm, (train,) = recipes.load_data(args.data, "train")
        teacher, _ = load_model(args.teacher)
        logits = predict(teacher.to(resolve_device(p.device)), train, norm).cpu()  # (N, K)
        with staged_dir(args.out) as out:
            soft_labels.save(out, logits)
            run.log_epoch(0, {"teacher_train_accuracy": (logits.argmax(1) == train.y).float().mean().item()})
            run.seal(out)


if __name__ == "__main__":
    stage.guard(main)
