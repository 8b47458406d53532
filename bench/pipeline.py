"""Where the pipeline's seconds go: `dvc repro -f` and a no-op `dvc repro`, stage by stage.

`dvc repro -f` on the default params, stage by stage, split into interpreter start-up, torch's import,
waiting on MLflow (the tracking helper) and the stage's own work, and a no-op `dvc repro` against DVC's own
`dvc status` and against a no-op `dvc repro` of a one-stage project (what DVC costs before it reads a
pipeline of ours). With --warm, each forced repro is followed by another as a rerun minutes later finds the
machine: the fork server and the zygote of the run before still there (KDPRUNE_WARM_IDLE, 5 minutes), its
MLflow service gone (30 s).

It runs in a temporary clone of this repository (its committed code, the package's included; its own
MLflow store; the repo's DVC cache shared, so nothing here is touched) and reports medians over --repeats
runs. Every stage writes its split to KDPRUNE_TIMINGS (see kdprune.stage). The targets of the project:
`dvc repro -f` at most 45 s and a no-op `dvc repro` at most 0.8 s on an idle 2-core machine, tracking at
most 15 % of a stage's time.

    .venv/bin/python bench/pipeline.py                 # 3 forced repros, 3 no-op repros: about 4 minutes
    .venv/bin/python bench/pipeline.py --compare       # and 3 with every stage in its own process, interleaved
    .venv/bin/python bench/pipeline.py --warm          # and 3 reruns with the warm starts of the run before
    .venv/bin/python bench/pipeline.py --repeats 1 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdprune import forkserver, tracker

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("startup", "torch_import", "tracking", "work")
TITLES = {"on": "fork server on (KDPRUNE_FORKSERVER=on)", "off": "fork server off (KDPRUNE_FORKSERVER=off)",
          "warm": "rerun, warm starts kept (fork server, zygote)"}


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run a command, fail loudly, return its wall time in seconds."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - start


def clone(dest: Path, env: dict[str, str]) -> None:
    sh(["git", "clone", "-q", str(ROOT), str(dest)], ROOT, env)
    shutil.copy(ROOT / "params.yaml", dest / "params.yaml")  # the working copy's params, committed or not
    sh(["dvc", "cache", "dir", "--local", str(ROOT / ".dvc/cache")], dest, env)


def one_stage_project(dest: Path, env: dict[str, str]) -> Path:
    """A git repository whose dvc.yaml has one stage copying one file, reproduced once: what a no-op `dvc
    repro` costs on this machine before any pipeline of ours is read."""
    dest.mkdir()
    (dest / "a.txt").write_text("a\n")
    (dest / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["dvc", "repro", "-q"]):
        sh(cmd, dest, env)
    return dest


def stage_rows(lines: list[dict]) -> dict[str, dict[str, float]]:
    """Per stage, the median over runs of each part; tracking is the time the stage waited on the helper."""
    by_stage: dict[str, list[dict]] = {}
    for line in lines:
        by_stage.setdefault(line["stage"], []).append(line)
    rows = {}
    for stage, runs in by_stage.items():
        parts = [{"startup": r["startup"], "torch_import": r["torch_import"],
                  "tracking": r["tracking_wait"] + r["close"], "work": r["work"] - r["tracking_wait"]} for r in runs]
        rows[stage] = {k: statistics.median(p[k] for p in parts) for k in PARTS}
    return rows


def print_table(rows: dict[str, dict[str, float]]) -> None:
    print("| stage | start-up s | torch import s | tracking s | work s | total s | tracking share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage, r in rows.items():
        total = sum(r.values())
        print(f"| {stage} | " + " | ".join(f"{r[k]:.2f}" for k in PARTS) + f" | {total:.2f} | {r['tracking'] / total:.0%} |")
    sums = {k: sum(r[k] for r in rows.values()) for k in PARTS}
    print("| all stages | " + " | ".join(f"{sums[k]:.2f}" for k in PARTS) + f" | {sum(sums.values()):.2f} | "
          f"{sums['tracking'] / sum(sums.values()):.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="forced and no-op repros to take medians over")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone and print its path")
    ap.add_argument("--compare", action="store_true",
                    help="also time every stage in its own process (KDPRUNE_FORKSERVER=off), interleaved")
    ap.add_argument("--warm", action="store_true",
                    help="also time a rerun after each forced repro, with its fork server and zygote kept")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats: expected at least 1, got {args.repeats}")
    work = Path(tempfile.mkdtemp(prefix="kdprune-bench-"))
    timings = work / "timings.jsonl"
    os.environ["KDPRUNE_SERVICE_DIR"] = str(work / "svc")  # this bench's own tracking service and fork server
    env = dict(os.environ, DVC_NO_ANALYTICS="1", KDPRUNE_TIMINGS=str(timings),
               PATH=f"{ROOT / '.venv/bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        repo = work / "repo"
        clone(repo, env)
        env["PYTHONPATH"] = str(repo / "src")  # the clone's package, not the editable install's (the working copy)
        modes = ("off", "on") if args.compare else ("on",)
        runs = [*modes, "warm"] if args.warm else list(modes)
        forced: dict[str, list[float]] = {m: [] for m in runs}
        lines: dict[str, list[dict]] = {m: [] for m in runs}
        outside: dict[str, list[float]] = {m: [] for m in runs}  # DVC, validate, the services' start
        for _ in range(args.repeats):
            for mode in runs:  # interleaved, so each sees the same machine
                timings.unlink(missing_ok=True)
                if mode == "warm":  # right after the "on" run: a rerun minutes later, whose MLflow service
                    tracker.stop_all(zygotes=False)  # has gone (30 s) and whose warm starts have not
                else:
                    forkserver.stop_all()  # each run starts as the first `dvc repro` in a while does: cold,
                    tracker.stop_all()  # no fork server, no MLflow service
                server = "off" if mode == "off" else "on"
                forced[mode].append(sh(["dvc", "repro", "-f"], repo, dict(env, KDPRUNE_FORKSERVER=server)))
                run = [json.loads(line) for line in timings.read_text().splitlines()]
                lines[mode] += run
                outside[mode].append(forced[mode][-1] - sum(r["startup"] + r["torch_import"] + r["work"] + r["close"]
                                                            for r in run))
        floor = one_stage_project(work / "floor", env)
        noop, status, floor_noop = [], [], []
        for _ in range(args.repeats):  # interleaved, so each sees the same machine
            noop.append(sh(["dvc", "repro"], repo, env))
            status.append(sh(["dvc", "status"], repo, env))
            floor_noop.append(sh(["dvc", "repro"], floor, env))
        print(f"median of {args.repeats}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
        for mode in runs:
            print(f"\n{TITLES[mode]}:")
            print_table(stage_rows(lines[mode]))
        print()
        for mode in runs:
            times = ", ".join(f"{t:.1f}" for t in forced[mode])
            print(f"dvc repro -f, {TITLES[mode]}: {statistics.median(forced[mode]):.1f} s (runs: {times}); "
                  f"outside the stages (DVC, validate, the services' start): {statistics.median(outside[mode]):.1f} s")
        if args.compare:
            print(f"speed-up: {statistics.median(forced['off']) / statistics.median(forced['on']):.2f}x")
        print(f"no-op dvc repro: {statistics.median(noop):.2f} s; dvc status: {statistics.median(status):.2f} s; "
              f"a one-stage DVC project's no-op dvc repro (DVC's own floor): {statistics.median(floor_noop):.2f} s")
    finally:
        forkserver.stop_all()
        tracker.stop_all()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
