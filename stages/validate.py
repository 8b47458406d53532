"""validate: check the whole of params.yaml before any stage runs, and write a constant marker.

Every stage depends on the marker. `dvc repro` removes a stage's outputs before running it, so a
bad value must stop the run here, first, while all outputs are still in place; a good change
rewrites the same marker bytes, so only the stages that read the change re-run.
"""

from kdprune import stage
from kdprune.files import write_atomic
from kdprune.params import SHAPES, check_machine, load_params

MARKER = "params.yaml is valid\n"


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "out").parse_args(argv)
    p = load_params(args.params)
    check_machine(p, args.params)
    if p.teacher.weights is not None:
        from kdprune.teacher import check_weights

        check_weights(p.teacher.spec(*SHAPES[p.data.name]), p.teacher.weights)
    write_atomic(args.out, MARKER)


if __name__ == "__main__":
    stage.guard(main)
