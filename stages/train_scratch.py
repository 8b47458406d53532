"""train_scratch: the student architecture trained on hard labels alone, the control for distillation."""

from kdprune import sharing, stage
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "data", "out", "plots").parse_args(argv)
    p = load_params(args.params)
    from kdprune import trainer

    trainer.train_on_labels("train_scratch", p, p.student, stage.section(p, "student", "seed", "device"), args,
                          label_fraction=p.student.label_fraction, l1=p.student.l1)


if __name__ == "__main__":
    stage.guard(sharing.once(main))
