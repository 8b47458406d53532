"""The pipeline under DVC itself, in throw-away git repositories made from this one: a repro whose lock a
fresh clone reproduces byte for byte, no-op and partial repros, a bad param, an experiment, a queued grid,
and a `dvc` killed mid-stage."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kdprune import procs
from tests.conftest import REPO, TINY, merge, stage_env, tree_bytes

pytestmark = pytest.mark.slow
RAN = re.compile(r"Running stage '(\w+)'")
ALL = ["validate", "prepare", "train_teacher", "soft_labels", "train_scratch", "train_student", "score", "prune",
       "finetune", "evaluate"]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def sh(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def dvc_env(root: Path, uri: str | None = None) -> dict[str, str]:
    env = stage_env(uri or f"sqlite:///{root / 'mlflow.db'}")
    env["DVC_NO_ANALYTICS"] = "1"
    if uri is None:
        env.pop("MLFLOW_TRACKING_URI")  # the project's own default store, also from experiment copies
    return env


# What these tests check needs every stage, not every criterion or a second epoch (the tiny preset's
# whole score stage runs end to end in test_stages' pipeline): the projects' tiny preset, leaner. The
# oracle stays: `dvc plots show` draws its agreement with the criterion.
LEAN = {"teacher": {"epochs": 1}, "student": {"epochs": 1}, "score": {"methods": ["taylor"]}}


def make_project(root: Path) -> None:
    """This repo's tracked files in a fresh git repo, on the tiny preset made `LEAN` (in conf/ too, so
    `dvc exp run -S` composes the same pipeline), committed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.startswith((".dvc/", "stages/", "src/", "conf/", "weights/", "data/raw/")) or name in (
                "dvc.yaml", ".dvcignore", ".gitignore", "params.yaml"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    config = root / "conf/config.yaml"
    config.write_text(config.read_text().replace("  - preset: digits", "  - preset: tiny"))
    preset = merge(TINY, LEAN)
    (root / "conf/preset/tiny.yaml").write_text("# @package _global_\n" + yaml.safe_dump(preset, sort_keys=False))
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), preset)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dvc_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*GIT, "commit", "-qm", "init"]):
        sh(cmd, root, env)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after one `dvc repro`, committed with its dvc.lock; never modified by a test."""
    root = tmp_path_factory.mktemp("project")
    make_project(root)
    env = dvc_env(root)
    assert RAN.findall(sh(["dvc", "repro"], root, env).stdout) == ALL
    sh(["git", "add", "-A"], root, env)
    sh([*GIT, "commit", "-qm", "repro"], root, env)
    return root


def clone(project: Path, dest: Path, shared_cache: bool = True) -> tuple[Path, dict[str, str]]:
    """A git clone of the project with its own default store; with the project's DVC cache shared (DVC's
    shared-cache setup) and the outputs checked out, or with no cache at all, as on a fresh machine."""
    env = dvc_env(dest)
    sh(["git", "clone", "-q", str(project), str(dest)], project, env)
    if shared_cache:  # what `dvc cache dir --local <dir>` writes (a second of DVC's start-up spared)
        (dest / ".dvc/config.local").write_text(f"[cache]\n    dir = {project / '.dvc/cache'}\n")
        sh(["dvc", "checkout", "-q"], dest, env)
    return dest, env


def lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def test_a_second_repro_runs_nothing(project):
    out = sh(["dvc", "repro"], project, dvc_env(project))
    assert RAN.findall(out.stdout) == []
    assert "Data and pipelines are up to date" in out.stdout


def test_recomputing_prepare_alone_leaves_everything_after_it_up_to_date(project, tmp_path):
    root, env = clone(project, tmp_path / "c")
    assert RAN.findall(sh(["dvc", "repro", "-f", "-s", "prepare"], root, env).stdout) == ["prepare"]
    assert RAN.findall(sh(["dvc", "repro"], root, env).stdout) == []


def test_a_file_placed_in_data_raw_reruns_prepare_and_nothing_its_output_leaves_unchanged(project, tmp_path):
    """data/raw is prepare's dependency: a dataset placed there reruns it (the tiny preset reads the digits,
    so its output, and everything after it, stays as it was); an edit of the folder's README does not."""
    root, env = clone(project, tmp_path / "c")
    notes = root / "data/raw/README.md"  # what the folder holds: .dvcignore leaves it out of the hash
    notes.write_text(notes.read_text() + "\nan edited line\n")
    assert "up to date" in sh(["dvc", "status", "prepare"], root, env).stdout
    raw = root / "data/raw/MNIST/raw/train-images-idx3-ubyte"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(bytes(16))
    assert "data/raw" in sh(["dvc", "status", "prepare"], root, env).stdout
    assert RAN.findall(sh(["dvc", "repro"], root, env).stdout) == ["prepare"]
    assert lock(root)["prepare"]["outs"] == lock(project)["prepare"]["outs"]


def test_editing_a_tracking_message_reruns_no_stage(project, tmp_path):
    root, env = clone(project, tmp_path / "c")
    for module in ("runs", "tracker", "store", "stage", "files", "errors", "progress", "switches"):
        path = root / f"src/kdprune/{module}.py"
        path.write_text(path.read_text() + "\n# an edited message\n")
    assert RAN.findall(sh(["dvc", "repro"], root, env).stdout) == []


def test_dvc_plots_show_draws_each_plot_once(project):
    """The curves are drawn by the named plots of dvc.yaml (one chart per quantity, every training stage
    on it), never again on their own as the CSV files that hold them; each image once."""
    shown = json.loads(sh(["dvc", "plots", "show", "--json"], project, dvc_env(project)).stdout)["data"]
    named = [p if isinstance(p, str) else next(iter(p))
             for p in yaml.safe_load((project / "dvc.yaml").read_text())["plots"]]
    assert all(len(v) == 1 for v in shown.values()), {k: len(v) for k, v in shown.items()}
    assert sorted(shown) == sorted(named) and len(named) == 9


def test_a_bad_param_fails_naming_the_key_and_leaves_outputs_byte_identical(project, tmp_path):
    root, env = clone(project, tmp_path / "c")
    before = {d: tree_bytes(root / d) for d in ("models", "data/prepared", "artifacts")}
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prune"]["amount"] = 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], root, env, check=False)
    assert out.returncode != 0
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: params.yaml: prune.amount: must be in [0.0, 1.0), got 1.5"]
    assert {d: tree_bytes(root / d) for d in before} == before
    del params["score"]  # a whole section gone: named, and nothing removed either
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], root, env, check=False)
    assert "error: params.yaml: score: missing" in out.stdout + out.stderr
    assert {d: tree_bytes(root / d) for d in before} == before


def test_an_experiment_on_prune_amount_reruns_only_what_reads_it(project, tmp_path):
    root, env = clone(project, tmp_path / "c")
    out = sh(["dvc", "exp", "run", "-S", "prune.amount=0.7"], root, env)
    assert RAN.findall(out.stdout) == ["validate", "prune", "finetune", "evaluate"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["prune"]["amount"] == 0.7 and params["preset"] == "tiny"  # composed from conf/
    # DVC's own views at a glance: the README's `dvc exp show` fits 160 columns, whole; a dozen metrics
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"^(dvc exp show [^\n#]*?)\s+#", readme, re.M)
    table = sh([*shlex.split(command), "--no-pager"], root, {**env, "COLUMNS": "160"}).stdout
    assert max(len(line) for line in table.splitlines()) <= 160 and "…" not in table, table
    assert "prune.amount" in table and "0.7" in table
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], root, env).stdout)
    metrics = [k for rev in shown.values() for f in rev["data"].values() for k in f["data"]]
    assert 0 < len(metrics) <= 20, metrics


def test_a_failed_stage_under_repro_says_how_to_get_its_outputs_back(project, tmp_path):
    root, env = clone(project, tmp_path / "c")
    shutil.rmtree(root / "data/prepared")  # what train_teacher reads is gone: it fails after DVC removed its outputs
    shutil.copytree(project / "data/prepared", root / "data/prepared")
    (root / "data/prepared/train.pt").write_bytes(b"not a tensor file")
    out = sh(["dvc", "repro", "-s", "train_teacher", "--force"], root, env, check=False)
    lines = (out.stdout + out.stderr).splitlines()
    assert any(line.startswith("error: ") and "data/prepared/train.pt" in line for line in lines), lines[-20:]
    assert "hint: `dvc checkout train_teacher` restores the outputs train_teacher had before this run" in lines


def _stage_processes(script: str, root: Path) -> list[int]:
    """The processes running `script` in `root`: other tests on other xdist workers run the same stages
    in their own projects at the same time, and are not this test's orphans."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and script.encode() in (proc / "cmdline").read_bytes() \
                    and Path(os.readlink(proc / "cwd")) == root.resolve():
                found.append(int(proc.name))
    return found


def test_killing_dvc_ends_the_stage_marks_its_run_killed_and_writes_nothing(project, tmp_path):
    """`kill -TERM <dvc pid>` during train_teacher: within 10 s no stage process is left, its run is
    KILLED, and models/teacher is not rewritten later (the acceptance of "no orphans").

    DVC runs the stage through $SHELL; /bin/sh (dash) forks the stage rather than exec it, so the stage's
    parent is a shell that outlives dvc and the kernel's parent-death signal never comes: the stage's
    watchdog, which checks dvc itself, must end it, though the killed dvc stays a zombie until this test
    reaps it."""
    import mlflow

    root, env = clone(project, tmp_path / "c")
    env["SHELL"] = "/bin/sh"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teacher"]["epochs"] = 500
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The store exists before this test's client polls it: a brand-new sqlite store opened by two
    # processes at once corrupts itself (the stages open it under a lock, this client would not).
    sh(["python", "-c", "from kdprune import store; store.ensure_experiment()"], root, env)
    log = (tmp_path / "dvc.log").open("w")
    dvc = subprocess.Popen(["dvc", "repro", "-s", "train_teacher"], cwd=root, env=env, stdout=log,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    try:
        deadline, run = time.monotonic() + 120, None
        while run is None:  # the stage is training: its run is RUNNING and has logged an epoch
            assert dvc.poll() is None and time.monotonic() < deadline, (tmp_path / "dvc.log").read_text()[-2000:]
            with contextlib.suppress(Exception):
                exp = client.get_experiment_by_name("kdprune")
                for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
                    if client.get_metric_history(r.info.run_id, "val_accuracy"):
                        run = r
            time.sleep(0.3)
        owner = run.data.tags["pipeline.owner"]  # the process dvc started for the stage
        os.kill(dvc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (_stage_processes("stages/train_teacher.py", root) or procs.alive(owner)) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _stage_processes("stages/train_teacher.py", root) == []
        assert procs.alive(owner) is False, owner
    finally:
        with contextlib.suppress(ProcessLookupError):
            dvc.kill()
        dvc.wait(timeout=30)
        log.close()
    deadline = time.monotonic() + 30
    while client.get_run(run.info.run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    time.sleep(3)
    assert not (root / "models/teacher/model.pt").exists() or \
        (root / "models/teacher/model.pt").read_bytes() == (project / "models/teacher/model.pt").read_bytes()


def test_a_forked_stage_writes_the_same_bytes_as_a_stage_in_its_own_process(project, tmp_path, services,
                                                                           monkeypatch):
    """kdprune.forkserver: train_teacher in its own process (the server off; then the run that starts the
    server) and forked from the server writes the project's model, byte for byte. Each run records the CPU
    time and peak memory of the process that trained (KDPRUNE_TIMINGS, what bench/mnist.py reports): the
    fork's own, never the few MiB of the process DVC started, which only waits for it."""
    from kdprune import forkserver, tracker

    root, env = clone(project, tmp_path / "c")
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    env["KDPRUNE_SERVICE_DIR"] = str(services)
    env["KDPRUNE_TRACKING"] = "off"  # the bytes are the same tracked or not (test_stages); no MLflow service here
    env["KDPRUNE_TIMINGS"] = str(tmp_path / "timings.jsonl")
    made = []
    try:
        for mode in ("off", "on", "on"):
            listening = bool(list((services / "fork").glob("*.sock")))
            sh(["dvc", "repro", "-f", "-s", "train_teacher"], root, {**env, "KDPRUNE_FORKSERVER": mode})
            made.append((mode, listening, tree_bytes(root / "models/teacher")))
    finally:
        forkserver.stop_all()
        tracker.stop_all()
    assert [m[:2] for m in made] == [("off", False), ("on", False), ("on", True)]  # the last one forked
    assert all(m[2] == tree_bytes(project / "models/teacher") for m in made)
    records = [json.loads(line) for line in (tmp_path / "timings.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["train_teacher"] * 3
    assert all(r["cpu"] > 0 and r["peak_mib"] > 100 for r in records), records  # torch alone holds more


def _run_queue(root: Path, env: dict[str, str], jobs: int, experiments: int, timeout: float) -> str:
    """`dvc queue start -j <jobs>`, wait until the queue is done, return `dvc queue status`.

    Done is `experiments` experiments saved (their git refs, read each second for milliseconds), or `dvc
    queue status` showing nothing queued or running (asked every 20 s: each asks costs seconds of CPU the
    experiments need). DVC's primary worker sometimes lives on after the queue is empty
    (treeverse/dvc-task#77): no pipe of ours is handed to the workers, and any worker still alive at the
    end is killed."""
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    while time.monotonic() < deadline:
        refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root, env).stdout.split()
        if sum(bool(re.fullmatch(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+", r)) for r in refs) >= experiments:
            break
        if time.monotonic() - asked > 20:
            if not re.search(r"\b(Queued|Running)\b", sh(["dvc", "queue", "status"], root, env).stdout):
                break
            asked = time.monotonic()
        time.sleep(1)
    settle = time.monotonic() + 60  # a saved experiment's worker records its success moments later
    while re.search(r"\b(Queued|Running)\b", status := sh(["dvc", "queue", "status"], root, env).stdout) \
            and time.monotonic() < min(deadline, settle):
        time.sleep(1)
    sh(["dvc", "queue", "stop"], root, env, check=False)
    for info in (root / ".dvc/tmp/exps/celery").glob("*.json"):
        pid = json.loads(info.read_text()).get("pid")
        with contextlib.suppress(OSError, TypeError):
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    return status


def _why_failed(root: Path, env: dict[str, str], status: str) -> str:
    """The queue's status, each failed experiment's log and the tracking services' logs: what a failure
    here needs to be understood after the run (the services' folder goes with the session)."""
    from kdprune import tracker

    logs = [sh(["dvc", "queue", "logs", line.split()[0]], root, env, check=False).stdout[-3000:]
            for line in status.splitlines() if re.search(r"\bFailed\b", line)]
    logs += [f"{p}:\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tracker.service_dir().glob("*.log"))]
    return "\n".join([status, *logs])


def test_a_fresh_clone_reproduces_the_lock_then_a_queued_grid_trains_once_per_seed(project, tmp_path):
    """Two acceptances on one fresh clone (no DVC cache, a store of its own). First, outputs are pure
    functions of their inputs: the clone's repro recomputes every stage and lands on the committed hashes,
    so the tree stays clean. Then a 2x2 grid over prune.amount and seed with two workers:
    four summary runs, each with its own params, and every upstream stage once per seed (seed 0's from the
    repro, through DVC's caches; seed 1's twins run side by side and share through kdprune.sharing)."""
    import mlflow

    root, env = clone(project, tmp_path / "q", shared_cache=False)
    # The committed validate marker stands; every other upstream stage runs and lands on the committed
    # hashes, so evaluate, whose deps are then unchanged, has nothing to do.
    assert RAN.findall(sh(["dvc", "repro"], root, env).stdout) == ALL[1:-1]
    assert lock(root) == lock(project)
    assert sh(["git", "status", "--porcelain"], root, env).stdout == ""

    sh(["dvc", "exp", "run", "--queue", "-S", "prune.amount=0.6,0.8", "-S", "seed=0,1"], root, env)
    status = _run_queue(root, env, jobs=2, experiments=4, timeout=1500)
    assert status.count("Success") == 4, _why_failed(root, env, status)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "kdprune"]
    exp = client.get_experiment_by_name("kdprune")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert all(r.info.status == "FINISHED" for r in runs)
    summaries = [r for r in runs if r.data.tags.get("pipeline.kind") == "summary" and r.data.tags.get("dvc.exp_name")]
    assert sorted((r.data.params["prune.amount"], r.data.params["seed"]) for r in summaries) == [
        ("0.6", "0"), ("0.6", "1"), ("0.8", "0"), ("0.8", "1")]
    assert all(r.info.run_name.endswith(" · " + r.data.tags["dvc.exp_name"]) for r in summaries)
    upstream = ["prepare", "train_teacher", "soft_labels", "train_scratch", "train_student", "score"]
    stages = sorted(r.data.tags["pipeline.stage"] for r in runs if r.data.tags.get("pipeline.kind") == "stage")
    assert stages == sorted(upstream * 2 + ["prune", "finetune"] * 5)  # the repro's, then the grid's
    teachers = sorted(r.data.params["seed"] for r in runs if r.data.tags.get("pipeline.stage") == "train_teacher")
    assert teachers == ["0", "1"]
    for s in summaries:  # each summary links a teacher of its own seed, found by fingerprint
        assert client.get_run(s.data.tags["pipeline.run.train_teacher"]).data.params["seed"] == s.data.params["seed"]
    assert client.search_runs([client.get_experiment_by_name("Default").experiment_id]) == []
    report = sh(["kdprune", "report", "--out", str(root / "reports")], root, env).stdout
    assert [line.split(" | ")[1] for line in report.splitlines() if line.startswith("| 0.")] == ["2", "2"]
