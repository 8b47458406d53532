"""MNIST end to end: every stage of dvc.yaml on the real data, timed, per seed; the preset's acceptance.

Per seed: a temporary project directory with the MNIST files (copied from --raw), links to the repo's
stages/ and weights/, and a params.yaml composed by `kdprune params preset=mnist seed=<s>
[student.label_fraction=<f>] [-S overrides]`; then the command of every stage of dvc.yaml, in its
order, verbatim (`python` is this interpreter), as a subprocess in that directory, with its own MLflow
sqlite store there, and its own fork server and MLflow service (a folder of services per seed, stopped
after it: every seed starts cold, and no server of the user's is touched). Each stage's wall time is
measured; its CPU time and peak resident memory are those it records (KDPRUNE_TIMINGS) of the process that
ran it, its workers included, because a stage forked from the fork server runs in no process this script
(or `/usr/bin/time -v`) started; validate, which records nothing, shows none. The fork server's and the
MLflow service's CPU time and peak memory are read from /proc. The models' test errors, parameters, MACs
and latency come from the metrics/evaluate.json that evaluate writes. Prints a per-stage table, the
pipeline time (the sum of the stages' wall times), the results table (mean ± sample std over --seeds), the
distill gain per seed, and the acceptance checks. Nothing is written into the repo (no MLflow store, no
DVC). Run from the repo root; on an idle 2-core machine a seed takes about 8 minutes (7 with
--label-fraction 0.1), and two or three times that when other work shares the cores:

    .venv/bin/python bench/mnist.py                                    # seed 0, every label
    .venv/bin/python bench/mnist.py --seeds 0 1 2
    .venv/bin/python bench/mnist.py --seeds 0 1 2 --label-fraction 0.1  # the distill gain
    .venv/bin/python bench/mnist.py --keep -S teacher.epochs=1 -S score.oracle=false   # overrides
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdprune import cli, forkserver, tracker
from kdprune.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("teacher", "student_scratch", "student", "pruned", "finetuned")  # evaluate.json's, in pipeline order
LABELS = {"teacher": "teacher", "student_scratch": "scratch student", "student": "distilled student",
          "pruned": "pruned", "finetuned": "fine-tuned"}
TAIL_LINES = 30  # of a failed stage's output
EXPERIMENT = "kdprune-bench"  # in each work dir's own MLflow store
TIMINGS = "timings.jsonl"  # what each stage records of itself (KDPRUNE_TIMINGS), in the work dir
# The project's acceptance on real data (the task that sized conf/preset/mnist.yaml)
MAX_PIPELINE_S = 15 * 60
MIN_TEACHER_ACCURACY = 0.992
MAX_FINETUNE_DROP = 0.003  # accuracy, against the distilled student
MAX_PARAMS_VS_TEACHER = 1 / 20
MAX_RSS_MIB = 3 * 1024
GAIN_LABEL_FRACTION = 0.1  # the distill gain must be positive at this student.label_fraction (or fewer labels)


@dataclass(frozen=True)
class StageRun:
    name: str
    seconds: float  # wall time of the stage's process
    cpu_seconds: float  # user + system CPU time of the process that ran it and its workers (NaN: unrecorded)
    peak_mib: float  # that process's peak resident memory (ru_maxrss), or its workers' where higher (NaN: unrecorded)
    load: float  # the machine's 1-minute load average as it ended: above ~2.5 on 2 cores, others were running


class StageFailed(RuntimeError):
    pass


def stage_commands() -> list[tuple[str, str]]:
    """(stage, command) of every stage of dvc.yaml, in the order dvc.yaml lists them (a valid order)."""
    with open(ROOT / "dvc.yaml") as f:
        stages = yaml.safe_load(f)["stages"]
    return [(name, " ".join(s["cmd"].split())) for name, s in stages.items()]


def compose_params(out: Path, seed: int, label_fraction: float | None, overrides: list[str]) -> Params:
    """`kdprune params preset=mnist ...`: the params.yaml `dvc exp run -S preset=mnist -S ...` composes."""
    extra = [f"seed={seed}"] + ([f"student.label_fraction={label_fraction}"] if label_fraction is not None else [])
    cli.main(["params", "preset=mnist", *extra, *overrides, "--conf", str(ROOT / "conf"), "--out", str(out)])
    return load_params(out)


def copy_raw(raw: Path, work: Path) -> None:
    """--raw (the MNIST folder, with raw/ inside) to <work>/data/raw/MNIST, where torchvision looks. Plain
    copies: the shared files are read-only, and a read-only folder could not be removed afterwards."""
    dest = work / "data" / "raw" / "MNIST"
    for src in sorted(raw.rglob("*")):
        target = dest / src.relative_to(raw)
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)


def tracking_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def child_env(work: Path) -> dict[str, str]:
    """The stages' environment: MLflow in a sqlite store of the work dir, no DVC context (a stage run
    under `dvc exp run` would share outputs through the repo's .dvc/tmp), this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_") and k != "MLFLOW_RUN_ID"}
    return env | {"MLFLOW_TRACKING_URI": tracking_uri(work), "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
                  "KDPRUNE_SHARE": "0",
                  "KDPRUNE_TIMINGS": str(work / TIMINGS),
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


def helper_usage(path: Path, name: str) -> StageRun | None:
    """The CPU time and peak memory of the process listening at `path` (the fork server, the MLflow
    service), read from /proc (Linux) through the socket's peer: forked from a zygote or started by a
    stage, neither is a child of this script to reap. None when none listens."""
    try:
        with tracker.dial(path) as sock:  # the peer's pid: the listener's own (a bare connection is a probe)
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    peak_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    if peak_kib is None:  # exited meanwhile: a zombie has no memory left to read
        return None
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks
    return StageRun(name, math.nan, cpu, peak_kib / 1024, os.getloadavg()[0])


def stop_helpers(work: Path) -> list[StageRun]:
    """This seed's fork server and MLflow service, measured, then stopped with the zygote."""
    found = [helper_usage(tracker.service_socket(tracking_uri(work), EXPERIMENT), "(MLflow tracking service)"),
             *(helper_usage(path, "(fork server)") for path in sorted((tracker.service_dir() / "fork").glob("*.sock")))]
    tracker.stop_all()
    forkserver.stop_all()
    return [h for h in found if h is not None]


def recorded_usage(work: Path, name: str) -> tuple[float, float] | None:
    """(CPU seconds, peak MiB) as the stage recorded them, or None: validate opens no run and records
    nothing."""
    with contextlib.suppress(FileNotFoundError):
        for line in (work / TIMINGS).read_text().splitlines():
            record = json.loads(line)
            if record["stage"] == name:
                return record["cpu"], record["peak_mib"]
    return None


def run_stage(name: str, cmd: str, work: Path, env: dict[str, str]) -> StageRun:
    """One stage's command in the work dir, its output to logs/<stage>.log: its wall time, and the CPU
    time and peak RSS it recorded (the process started here may only have waited for a fork)."""
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise StageFailed(f"stage {name} failed (exit code {proc.returncode}): {cmd}\n"
                          f"--- last {TAIL_LINES} lines of {log} ---\n{tail(log)}")
    cpu, mib = recorded_usage(work, name) or (math.nan, math.nan)
    return StageRun(name, seconds, cpu, mib, os.getloadavg()[0])


def tail(path: Path, n: int = TAIL_LINES) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-n:])


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline for one seed in a fresh work dir, with services of its own: its stage runs,
    the fork server's and MLflow service's footprints, and evaluate.json."""
    work = Path(tempfile.mkdtemp(prefix=f"kdprune-mnist-seed{seed}-"))
    os.environ["KDPRUNE_SERVICE_DIR"] = str(work / "svc")  # the stages' (child_env) and stop_helpers'
    ok = False
    try:
        p = compose_params(work / "params.yaml", seed, args.label_fraction, args.overrides)
        copy_raw(args.raw, work)
        for folder in ("stages", "weights"):  # the commands name stages/<stage>.py; teacher.weights a file in weights/
            (work / folder).symlink_to(ROOT / folder, target_is_directory=True)
        env = child_env(work)
        stages = []
        for name, cmd in stage_commands():
            stages.append(run_stage(name, cmd, work, env))
            s = stages[-1]
            log(f"seed {seed}: {name} {s.seconds:.1f} s ({num(s.cpu_seconds, '.1f')} s CPU), "
                f"{num(s.peak_mib, '.0f')} MiB, load {s.load:.1f}")
        with open(work / "metrics" / "evaluate.json") as f:
            results = json.load(f)
        ok = True
    finally:
        helpers = stop_helpers(work)
        if args.keep or not ok:
            log(f"seed {seed}: work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {"seed": seed, "params": p, "stages": stages, "helpers": helpers, "results": results}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mean_std(values: list[float], fmt: str = "{:.1f}") -> str:
    """'mean ± sample std' (just the value for one seed)."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def num(value: float, spec: str) -> str:
    """A figure, or '-' where none was measured (NaN)."""
    return "-" if math.isnan(value) else format(value, spec)


def known(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def rounded(value: float, digits: int | None) -> float | None:
    """For the JSON line: None where nothing was measured (NaN is no JSON)."""
    return None if math.isnan(value) else round(value, digits)


def markdown(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def stage_table(runs: list[dict[str, Any]]) -> str:
    """Per stage, over seeds: wall seconds (median and range: the machine is shared, timings are noisy),
    CPU seconds, peak MiB, and the load average as it ended."""
    rows = []
    for i, name in enumerate(s.name for s in runs[0]["stages"]):
        secs, cpu, mib, load = ([getattr(r["stages"][i], k) for r in runs]
                                for k in ("seconds", "cpu_seconds", "peak_mib", "load"))
        rows.append([name, f"{statistics.median(secs):.1f}", f"{min(secs):.1f}-{max(secs):.1f}",
                     f"{statistics.median(cpu):.1f}" if known(cpu) == cpu else "-",
                     f"{statistics.median(mib):.0f}" if known(mib) == mib else "-",
                     num(max(known(mib), default=math.nan), ".0f"), f"{statistics.median(load):.1f}"])
    for name in dict.fromkeys(h.name for r in runs for h in r["helpers"]):  # beside the stages, not in the
        found = [h for r in runs for h in r["helpers"] if h.name == name]  # pipeline's time
        rows.append([name, "-", "-", f"{statistics.median(h.cpu_seconds for h in found):.1f}",
                     f"{statistics.median(h.peak_mib for h in found):.0f}",
                     f"{max(h.peak_mib for h in found):.0f}", ""])
    totals = [pipeline_seconds(r) for r in runs]
    cpus = [math.fsum(known([s.cpu_seconds for s in r["stages"]])) for r in runs]
    rows.append(["**pipeline**", f"**{statistics.median(totals):.1f}**", f"{min(totals):.1f}-{max(totals):.1f}",
                 f"{statistics.median(cpus):.1f}", "", f"{max(peak(r) for r in runs):.0f}", ""])
    return markdown(["stage", "median s", "range s", "median CPU s", "median peak MiB", "max peak MiB",
                     "median load"], rows)


def pipeline_seconds(run: dict[str, Any]) -> float:
    return sum(s.seconds for s in run["stages"])


def peak(run: dict[str, Any]) -> float:
    """The highest peak resident memory of any stage or helper of one seed, in MiB."""
    return max(known([s.peak_mib for s in run["stages"] + run["helpers"]]), default=math.nan)


def results_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for m in MODELS:
        res = [r["results"][m] for r in runs]
        rows.append([LABELS[m], mean_std([x["errors"] for x in res]),
                     mean_std([100 * x["accuracy"] for x in res], "{:.2f}"),
                     mean_std([x["params"] for x in res], "{:,.0f}"), mean_std([x["macs"] for x in res], "{:,.0f}"),
                     mean_std([x["latency_ms_b256"] for x in res], "{:.2f}")])
    p = runs[0]["params"]
    return markdown(["model", "test errors / 10,000", "accuracy %", "params", "MACs", "latency b256 ms"], rows) \
        + f"\n\n{len(runs)} seed(s) {[r['seed'] for r in runs]}, mean ± sample std; student.label_fraction " \
          f"{p.student.label_fraction}; latency: eager PyTorch, {p.evaluate.threads} thread(s), median of " \
          f"{p.evaluate.rounds} rounds"


def gain_lines(runs: list[dict[str, Any]]) -> str:
    """The distill gain (distilled minus scratch test accuracy) per seed, in points, and its mean ± std."""
    gains = [100 * r["results"]["student"]["distill_gain"] for r in runs]
    per_seed = ", ".join(f"seed {r['seed']}: {g:+.2f}" for r, g in zip(runs, gains))
    return f"distill gain (points): {per_seed}; mean {mean_std(gains, '{:+.2f}')}"


def checks(runs: list[dict[str, Any]]) -> list[str]:
    """The acceptance, per seed: what holds and by how much."""
    lines = []
    for r in runs:
        res, total = r["results"], pipeline_seconds(r)
        top = peak(r)
        ft = res["finetuned"]
        items = [(total <= MAX_PIPELINE_S, f"pipeline {total:.0f} s <= {MAX_PIPELINE_S}"),
                 (res["teacher"]["accuracy"] >= MIN_TEACHER_ACCURACY,
                  f"teacher {100 * res['teacher']['accuracy']:.2f}% >= {100 * MIN_TEACHER_ACCURACY:.1f}%"),
                 (ft["accuracy_drop_vs_student"] <= MAX_FINETUNE_DROP,
                  f"fine-tuned drop {100 * ft['accuracy_drop_vs_student']:+.2f} pt <= {100 * MAX_FINETUNE_DROP:.1f}"),
                 (ft["params_vs_teacher"] <= MAX_PARAMS_VS_TEACHER,
                  f"fine-tuned params 1/{1 / ft['params_vs_teacher']:.1f} of the teacher's <= 1/20"),
                 (top < MAX_RSS_MIB, f"peak RSS {num(top, '.0f')} MiB < {MAX_RSS_MIB}")]
        gain = res["student"]["distill_gain"]
        if r["params"].student.label_fraction <= GAIN_LABEL_FRACTION:  # with every label KD need not win
            items.append((gain > 0, f"distill gain {100 * gain:+.2f} pt > 0"))
        lines.append(f"seed {r['seed']}: " + "; ".join(("ok " if good else "FAIL ") + text for good, text in items))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override of the preset, as `dvc exp run -S` takes it (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--label-fraction", type=float, default=None,
                    help="student.label_fraction (default: the preset's)")
    here = ROOT / "data" / "raw" / "MNIST"  # where `prepare` reads them; else the team's benchmark copy
    ap.add_argument("--raw", type=Path, default=here if here.is_dir() else ROOT.parent / "shared" / "data" / "MNIST",
                    help="the MNIST folder (with raw/ and its four files inside)")
    ap.add_argument("--keep", action="store_true", help="keep each seed's work dir (a failed seed's is always kept)")
    args = ap.parse_args()
    if not (args.raw / "raw").is_dir():
        ap.error(f"--raw {args.raw}: no raw/ folder inside (place the four MNIST files in data/raw/MNIST/raw/, "
                 "or name the folder that holds raw/)")
    with tempfile.TemporaryDirectory(prefix="kdprune-mnist-params-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()):  # a bad -S or seed stops here, before any seed's work dir
        for seed in args.seeds:  # (a seed checked only when its turn came cost the seeds before it)
            compose_params(Path(tmp) / "params.yaml", seed, args.label_fraction, args.overrides)
    start = time.perf_counter()
    try:
        runs = [run_seed(s, args) for s in args.seeds]
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(stage_table(runs), end="\n\n")
    print(results_table(runs), end="\n\n")
    print(gain_lines(runs))
    print("\n".join(checks(runs)))
    print(json.dumps({"bench": "mnist", "seconds": round(time.perf_counter() - start, 1),
                      "seeds": [{"seed": r["seed"], "pipeline_s": round(pipeline_seconds(r), 1),
                                 "stages": {s.name: {"s": round(s.seconds, 1), "cpu_s": rounded(s.cpu_seconds, 1),
                                                    "peak_mib": rounded(s.peak_mib, None), "load": round(s.load, 1)}
                                            for s in r["stages"]},
                                 **{m: {k: r["results"][m][k] for k in ("accuracy", "errors", "params", "macs",
                                                                          "latency_ms_b256")} for m in MODELS}}
                                for r in runs]}))


if __name__ == "__main__":
    main()
