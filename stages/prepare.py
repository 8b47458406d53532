"""prepare: read the dataset, split it train/val/test (stratified, from the seed), write the splits."""

from kdprune import stage
from kdprune.files import staged_dir
from kdprune.params import load_params

READS = ("seed", "threads", "data")


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "raw", "out").parse_args(argv)
    p = load_params(args.params)
    with stage.run("prepare", p, READS, inputs={}, outputs={args.out: "folder"}) as run:
        from kdprune.data import prepare

        with staged_dir(args.out) as out:
            meta = prepare(p.data.name, args.raw, out, p.data.val_fraction, p.data.test_fraction, p.seed,
                           p.data.download)
            run.log_epoch(0, {f"{s}_samples": n for s, n in meta["counts"].items()})
            run.seal(out)


if __name__ == "__main__":
    stage.guard(main)
