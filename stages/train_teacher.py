"""train_teacher: train the teacher CNN on hard labels."""

from kdprune import sharing, stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    from kdprune import trainer

    trainer.train_on_labels("train_teacher", p, p.teacher, stage.section(p, "teacher", "seed", "device"), args)


if __name__ == "__main__":
    stage.guard(sharing.once(main))
