"""The `kdprune` command: a sweep's report, runs left open closed, params.yaml composed from conf/.

`report` summarises a sweep, `doctor` closes runs a dead process left open, `params` writes params.yaml
from conf/ (the Hydra composition `dvc exp run -S` does)."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from kdprune.errors import ParamsError, TrackingError


def report(args: argparse.Namespace) -> None:
    from kdprune import sweep

    sweep.check_out(args.out)  # in seconds, not after the store's
    runs = sweep.summary_runs(args.experiment)
    if not runs:
        raise TrackingError(f"experiment {args.experiment!r} has no finished summary run yet")
    rows = sweep.group(runs)
    paths = sweep.write_report(rows, args.out)
    print(sweep.table(rows), end="")
    print(f"{len(runs)} summary runs in {len(rows)} groups; wrote {', '.join(map(str, paths))}")
    for line in sweep.champions(runs):
        print(line)
    if args.log:
        sweep.log_report(args.experiment, len(runs), paths)


def doctor(args: argparse.Namespace) -> None:
    """Close the runs of this store that a killed stage left RUNNING, or that a lost server left open. It
    reads the store and closes runs, nothing else: an experiment name mistyped is an error, not a new
    experiment (on a team's server too)."""
    from kdprune import runs, store

    name = store.experiment_name()
    _, exp = store.find_experiment(name)
    uri = store.tracking_uri()
    if exp is None:
        raise TrackingError(f"{uri} has no experiment {name!r} (MLFLOW_EXPERIMENT_NAME): no run to close")
    with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints "View run ... at ..." per run closed on a server
        closed = runs.reconcile(exp.experiment_id)
    print("\n".join(closed) if closed else f"no run left open in {uri}")


def params(args: argparse.Namespace) -> None:
    """params.yaml from conf/config.yaml and the overrides, exactly as `dvc exp run -S` composes it. The
    file is composed and checked aside, and replaces --out only when it is valid: a bad override leaves
    the old file as it was."""
    import os
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    from kdprune.files import write_atomic
    from kdprune.params import check_sizes, load_params

    conf = args.conf.resolve()
    if not (conf / "config.yaml").exists():
        raise ParamsError(f"{conf / 'config.yaml'}: missing (run from the project root, or pass --conf)")
    with tempfile.TemporaryDirectory(prefix="kdprune-params-") as tmp:
        staged = Path(tmp) / args.out.name  # (its suffix tells Hydra the format)
        try:
            compose_and_dump(str(staged), str(conf), None, "config", os.getcwd(), list(args.overrides))
        except Exception as e:  # hydra's own errors name the override or the config group
            raise ParamsError(f"{conf}: {str(e).splitlines()[0]}") from e
        try:
            check_sizes(load_params(staged), staged)
        except ParamsError as e:  # named as the file it would have been
            raise ParamsError(str(e).replace(str(staged), str(args.out))) from None
        write_atomic(args.out, staged.read_bytes())
    print(f"wrote {args.out} from {conf / 'config.yaml'}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))


def main(argv: list[str] | None = None) -> None:
    from kdprune.store import experiment_name

    ap = argparse.ArgumentParser(prog="kdprune", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="mean, std and n of every headline metric per swept setting, "
                                        "a Pareto plot, the registry's champion; reads MLFLOW_TRACKING_URI")
    rep.add_argument("--experiment", default=experiment_name(), help="MLflow experiment to read")
    rep.add_argument("--out", type=Path, default=Path("reports"), help="folder for sweep.md, sweep.csv, pareto.png")
    rep.add_argument("--log", action="store_true", help="also log the outputs as an MLflow run of their own")
    sub.add_parser("doctor", help="close runs left RUNNING by a killed stage or a lost tracking server")
    par = sub.add_parser("params", help="write params.yaml from conf/ (e.g. `kdprune params preset=mnist`)")
    par.add_argument("overrides", nargs="*", help="Hydra overrides, as `dvc exp run -S` takes them")
    par.add_argument("--conf", type=Path, default=Path("conf"), help="the Hydra config folder")
    par.add_argument("--out", type=Path, default=Path("params.yaml"), help="the params file to write")
    args = ap.parse_args(argv)
    try:
        {"report": report, "doctor": doctor, "params": params}[args.command](args)
    except (TrackingError, ParamsError) as e:  # one line per problem, each saying whose
        print("\n".join(f"kdprune: error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a folder that cannot be written: the path and the reason
        print(f"kdprune: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
