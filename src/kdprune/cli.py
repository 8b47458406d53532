"""The `kdprune` command: `kdprune report` summarises a sweep from the tracking store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdprune.errors import TrackingError


def report(args: argparse.Namespace) -> None:
    from kdprune import sweep

    runs = sweep.summary_runs(args.experiment)
    if not runs:
        raise TrackingError(f"experiment {args.experiment!r} has no finished summary run yet")
    rows = sweep.group(runs)
    paths = sweep.write_report(rows, args.out)
    print(sweep.table(rows), end="")
    print(f"{len(runs)} summary runs in {len(rows)} groups; wrote {', '.join(map(str, paths))}")
    if args.log:
        from kdprune.tracking import stage_run
        import mlflow

        with stage_run("report", {"experiment": args.experiment, "runs": len(runs)}, kind="report"):
            for p in paths:
                mlflow.log_artifact(str(p))


def main(argv: list[str] | None = None) -> None:
    from kdprune.tracking import experiment_name

    ap = argparse.ArgumentParser(prog="kdprune", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="mean, std and n of every headline metric per swept setting, "
                                        "a Pareto plot; reads MLFLOW_TRACKING_URI")
    rep.add_argument("--experiment", default=experiment_name(), help="MLflow experiment to read")
    rep.add_argument("--out", type=Path, default=Path("reports"), help="folder for sweep.md, sweep.csv, pareto.png")
    rep.add_argument("--log", action="store_true", help="also log the outputs as an MLflow run of their own")
    args = ap.parse_args(argv)
    try:
        {"report": report}[args.command](args)
    except TrackingError as e:
        print(f"kdprune: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
