"""prepare: read the dataset, split it train/val/test (stratified, from the seed), write the splits."""

from kdprune import sharing, stage
from kdprune.files import staged_dir
from kdprune.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = stage.parser(__doc__, "raw", "out").parse_args(argv)
    p = load_params(args.params)
    from kdprune.data import prepare
    from kdprune.tracking import log_epoch, stage_run, write_run_record

    with stage_run("prepare", stage.section(p, "data", "seed")) as run, staged_dir(args.out) as out:
        meta = prepare(p.data.name, args.raw, out, p.data.val_fraction, p.data.test_fraction, p.seed,
                       p.data.download)
        write_run_record(out, run)
        log_epoch(0, {f"{s}_samples": n for s, n in meta["counts"].items()})


if __name__ == "__main__":
    stage.guard(sharing.once(main))
