"""What every stage script shares: its command line, its run (inputs checked, MLflow helper, threads),
and how it ends: one line per expected failure, KILLED on Ctrl-C, SIGTERM or the death of its `dvc`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from kdprune import files, manifest, procs
from kdprune.errors import CheckpointError, DataError, ParamsError, TrackingError
from kdprune.params import Params, flatten, section
from kdprune.switches import SWITCHES, switch

EXPECTED = (ParamsError, CheckpointError, DataError, TrackingError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (or the death of the `dvc` that started the stage): the run closes KILLED, no output."""


class Reused(Exception):
    """An identical stage of a sibling experiment made the outputs; they were restored, nothing computed."""


def parser(doc: str, *paths: str) -> argparse.ArgumentParser:
    """--params plus one required --<path> option per input or output the stage touches."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file")
    for name in paths:
        ap.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True, dest=name)
    return ap


def guard(main: Callable[[], Any]) -> None:
    """Run a stage: expected failures print one line per problem and exit 2; Ctrl-C/SIGTERM exit 130.

    A stage script's `main` is handed to the fork server when one listens (kdprune.forkserver): this
    process then only waits for the fork that runs it, and exits with its status."""
    if getattr(main, "__module__", None) == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]):
        from kdprune import forkserver  # (a request for help is answered here: no server to start for it)

        try:
            check_environment()
        except (ValueError, TrackingError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        status = forkserver.hand_off()
        if status is not None:
            raise SystemExit(status)
    signal.signal(signal.SIGTERM, _terminate)
    _die_with_dvc()
    files.replaced.clear()  # (a stage run in a process that ran others: the tests)
    try:
        main()
    except Reused as e:
        print(e, file=sys.stderr)
    except EXPECTED as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        _recovery_hint()
        raise SystemExit(2) from None
    except OSError as e:  # a full or read-only disk, a vanished folder: the path and the reason
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        _recovery_hint()
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; " + ("no output written" if not files.replaced else
                                        "its outputs were in place, but unrecorded: `dvc repro` runs it again"),
              file=sys.stderr)
        raise SystemExit(130) from None


def check_environment() -> None:
    """The variables a stage reads, before any work, a bad value raising ValueError (or TrackingError)
    naming its variable: the switches, the fork server's and the warm starts' (the zygote of the MLflow
    service reads KDPRUNE_WARM_IDLE, so with the fork server off too), and where the services listen (made
    now for a fork server; a stage run on its own makes it when it tracks) and the timings go."""
    from kdprune import forkserver, tracker

    for name in SWITCHES:
        switch(name)
    tracker.warm_idle()
    if forkserver.enabled():
        forkserver.fork_dir()  # where the fork server will listen: a folder that cannot hold it named before any work
    else:
        tracker.service_dir(make=False)
    timings = os.environ.get("KDPRUNE_TIMINGS")
    if timings and (Path(timings).is_dir() or not Path(timings).absolute().parent.is_dir()):
        raise ValueError(f"KDPRUNE_TIMINGS: {timings}: expected a file in an existing folder")


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def _recovery_hint() -> None:
    """Under `dvc repro`, which removed the stage's outputs before running it: how to get them back."""
    stage = os.environ.get("DVC_STAGE", "").rpartition(":")[2]
    if stage and stage != "validate":
        print(f"hint: `dvc checkout {stage}` restores the outputs {stage} had before this run", file=sys.stderr)


def _die_with_dvc() -> None:
    """A stage never outlives the `dvc` that started it: the kernel signals us when our parent dies
    (PR_SET_PDEATHSIG), and a watchdog thread checks the nearest `dvc` ancestor every second (our
    parent may be a shell); either way we get SIGTERM, close the run as KILLED and write nothing."""
    if not procs.forked():  # a fork's parent is the fork server, which may go first
        procs.die_with_parent(signal.SIGTERM)
    ancestor = procs.dvc_ancestor()
    if ancestor is None:
        return

    def watch() -> None:
        while not _stop.wait(1.0):
            if procs.alive(ancestor) is False:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="dvc-watchdog", daemon=True).start()


_stop = threading.Event()


@dataclass
class Run:
    """An executed stage's MLflow run (through the tracking helper) and what it read."""
    stage: str
    tracker: Any
    inputs: dict[str, str]  # role -> fingerprint of the directory read
    output: str | None = None

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        """One batched call per epoch, not waited for."""
        self.tracker.post("log_epoch", step=step, metrics={k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: Path) -> None:
        self.tracker.post("log_artifact", path=str(Path(path).resolve()))

    def log_model(self, onnx_file: Path, name: str, example: Any, logits: Any, names: tuple[str, str]) -> None:
        """The ONNX file as the MLflow model `name` (its role), with an input example and a signature
        whose tensors bear the graph's input and output `names`. Not waited for: the stage goes on while
        MLflow copies the file, which stays in the staged output until `seal` has every answer."""
        self.tracker.post("log_model", path=str(Path(onnx_file).resolve()), name=name,
                          example=example.tolist(), logits=logits.tolist(), names=list(names))

    def seal(self, out_dir: Path) -> str:
        """manifest.json into the finished (still staged) output directory; its fingerprint goes on the run.
        Every message sent so far is answered first, so a tracking failure stops the stage before its
        outputs replace the old ones."""
        self.tracker.wait(self.tracker.sent if hasattr(self.tracker, "sent") else 0)
        self.output = manifest.write(out_dir, self.stage, self.inputs)
        return self.output


@contextlib.contextmanager
def run(name: str, p: Params, reads: tuple[str, ...], inputs: dict[str, Path | str],
        outputs: dict[Path, str], kind: str = "stage", title: str | None = None) -> Iterator[Run]:
    """Check that the outputs ({path: "file" or "folder"}) can be written where they go (a stage run by hand
    learned of a folder given for a file after its work), check the inputs against their manifests, have
    the helper open the MLflow run while torch is imported (threads and seed set from params), and close
    the run FINISHED, FAILED or KILLED.

    The stage does not wait for the run to exist: a server that is down is found first (a one-second
    health check), any other failure of the helper stops the stage at its next message."""
    from kdprune import sharing, store, tracker as tracking
    from kdprune.files import check_writable

    for path, what in outputs.items():
        check_writable(path, what)
    if switch("KDPRUNE_TRACKING") != "off":
        store.check_reachable(store.tracking_uri())
    tracker, clock, finished = tracking.start(), {"entered": time.perf_counter()}, False
    # The summary stage (evaluate) is never shared: it measures latency, whose figures are no function of
    # its inputs, and it owns its pipeline execution's summary run and registration (nor does DVC's
    # run-cache serve it: its measured outputs are uncached).
    shared = sharing.once(name, p, reads, inputs, list(outputs)) if kind != "summary" else contextlib.nullcontext()
    try:
        with shared:
            fingerprints = {role: manifest.fingerprint(path) for role, path in inputs.items()}
            tracker.post("open", stage=name, kind=kind, name=title or f"{name} · {label(p)}",
                         params=flatten(p) if kind == "summary" else section(p, *reads), inputs=fingerprints,
                         owner=procs.identity(procs.stage_pid()), execution=procs.dvc_ancestor(),
                         exp_name=os.environ.get("DVC_EXP_NAME"), commit=procs.git_commit(),
                         local=str(store.local_dir()))
            from kdprune import determinism

            determinism.setup(p.seed, p.threads)  # imports torch: meanwhile the helper imports MLflow
            machine = {"pipeline.cpu": cpu()}  # written with the run's last tags: no call of its own
            clock["torch"] = time.perf_counter()
            run = Run(name, tracker, fingerprints)
            clock["work"] = time.perf_counter()
            status = "FAILED"
            try:
                yield run
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                clock["done"], clock["waited"] = time.perf_counter(), tracker.waited
                finished = _finish(tracker, status, run.output, machine)
    finally:
        tracker.close(wait=not finished)
        _record_timings(name, clock)


def cpu() -> str:
    """The processor and the level of torch's vector kernels on it (lowered by ATEN_CPU_CAPABILITY): the
    bytes a stage writes depend on both (README, Reproducibility), so its run says which it had."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as lines:  # the first core's block
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return f"{model} · {torch.backends.cpu.get_cpu_capability()}"


def _record_timings(name: str, clock: dict[str, float]) -> None:
    """With KDPRUNE_TIMINGS=<file>: one JSON line of where this stage's seconds went (bench/pipeline.py):
    `work` holds `tracking_wait`, the time it spent blocked on the helper; `close` is all tracking. Also
    the CPU seconds and peak resident memory of the process that ran it, its workers included: a stage
    forked from the fork server does its work in a process that `/usr/bin/time` on the stage's command
    never sees (bench/mnist.py)."""
    target = os.environ.get("KDPRUNE_TIMINGS")
    if not target or "done" not in clock:
        return
    import json
    import resource

    end = time.perf_counter()
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    line = {"stage": name, "startup": procs.age() - (end - clock["entered"]),
            "torch_import": clock["torch"] - clock["entered"], "work": clock["done"] - clock["work"],
            "close": end - clock["done"], "tracking_wait": clock["waited"],
            "cpu": me.ru_utime + me.ru_stime + workers.ru_utime + workers.ru_stime,
            "peak_mib": max(me.ru_maxrss, workers.ru_maxrss) / 1024}  # Linux: KiB
    try:
        with open(target, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as e:  # after the stage's own end, whose error (if any) is the one to report
        print(f"warning: KDPRUNE_TIMINGS: {target}: {e.strerror or e}; this stage's timings not recorded",
              file=sys.stderr)


def _finish(tracker: Any, status: str, output: str | None, tags: dict[str, str]) -> bool:
    """Close the run; when the stage itself failed, its own error is the one reported. True once the
    helper has answered."""
    if status == "FINISHED":
        tracker.call("finish", status=status, output=output, tags=tags)
        return True
    return tracker.last("finish", status=status, tags=tags)


def label(p: Params) -> str:
    """What a pipeline execution is, in a few words: the preset and the headline setting first (what a
    narrow column keeps), then the DVC experiment."""
    setting = f"{p.preset} {p.prune.criterion} {p.prune.amount} seed {p.seed}"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{setting} · {exp}" if exp else setting
