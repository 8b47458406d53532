"""The team stack (`make team-up` / `team-join` / `team-down`, scripts/team.py) with real parts: PostgreSQL,
SeaweedFS's S3 gateway and an MLflow server on free ports in a temporary folder. A run logged through the
server is read back from PostgreSQL and its artifact from the bucket; `dvc push` from one throw-away repo and
`dvc pull` into a clone of it go through the DVC bucket; team-down leaves no process and no port behind.

The tests run in file order on one stack (module fixture); the last one takes it down."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

PY = sys.executable
BIN = Path(PY).parent
TEAM_PY = REPO / "scripts" / "team.py"
NAMES = {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
         "KDPRUNE_DVC_REMOTE"}
SERVICES = ("postgres", "s3", "mlflow")


def load_team() -> Any:
    spec = importlib.util.spec_from_file_location("kdprune_team_script", TEAM_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points at another stack, or at an outer make."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME", "KDPRUNE_DVC_REMOTE",
            "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("AWS_", "TEAM_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com", **extra)
    return env


def parse_exports(stdout: str) -> dict[str, str]:
    """`export NAME=value` lines and nothing else, as a shell's eval would read them."""
    out = {}
    for line in stdout.splitlines():
        words = shlex.split(line)
        assert len(words) == 2 and words[0] == "export" and "=" in words[1], f"not an export line: {line!r}"
        name, _, value = words[1].partition("=")
        out[name] = value
    return out


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not true after {timeout}s: {what}")
        time.sleep(0.2)


@dataclass
class Stack:
    root: Path      # the temporary folder: the team folder and the test's repos live here
    team_dir: Path
    exports: dict[str, str]
    stdout: str

    def make(self, target: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", target, f"TEAM_DIR={self.team_dir}"], cwd=REPO, env=base_env(),
                              capture_output=True, text=True, timeout=timeout)

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(**self.exports, **extra)

    def config(self) -> dict[str, Any]:
        return json.loads((self.team_dir / "team.json").read_text())

    def records(self) -> dict[str, dict[str, Any]]:
        return {f.stem: json.loads(f.read_text()) for f in (self.team_dir / "run").glob("*.json")}

    def processes(self) -> list[Any]:
        """Every live process of the recorded services: leader, its process group, their descendants."""
        import psutil

        found: dict[int, Any] = {}
        recs = self.records().values()
        for p in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if any(os.getpgid(p.pid) == r["pgid"] for r in recs):
                    found[p.pid] = p
        for p in list(found.values()):
            with contextlib.suppress(psutil.Error):
                found.update((c.pid, c) for c in p.children(recursive=True))
        return list(found.values())


def alive(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    team = load_team()
    if team.pg_bindir() is None and os.geteuid() != 0:
        pytest.skip("PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)")
    # not pytest's tmp_path: /tmp/pytest-of-root is 0700, and the postgres user must reach its data directory
    root = Path(tempfile.mkdtemp(prefix="kdprune-team-", dir="/tmp"))
    root.chmod(0o755)
    team_dir = root / "team"
    stack = Stack(root, team_dir, {}, "")
    try:
        up = stack.make("team-up")
        assert up.returncode == 0, f"make team-up failed:\n{up.stderr[-4000:]}"
        stack.exports, stack.stdout = parse_exports(up.stdout), up.stdout
        yield stack
    finally:
        stack.make("team-down", timeout=180)
        for p in stack.processes():  # only if team-down failed: never leave servers behind
            with contextlib.suppress(Exception):
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{shlex.join(argv)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def s3(stack: Stack) -> Any:
    import boto3

    e = stack.exports
    return boto3.client("s3", endpoint_url=e["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def keys(stack: Stack, bucket: str) -> list[str]:
    pages = s3(stack).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# -- without a stack ---------------------------------------------------------------------------------------


def test_join_names_the_missing_variable(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    env = base_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:9",
                   AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    res = subprocess.run([PY, str(TEAM_PY), "join"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "KDPRUNE_DVC_REMOTE" in lines[0], res.stderr
    assert "AWS_ACCESS_KEY_ID" not in lines[0]
    assert list((repo / ".dvc").iterdir()) == []


# -- one stack, in file order ------------------------------------------------------------------------------


def test_up_prints_only_the_exports_and_a_second_up_starts_nothing(stack: Stack) -> None:
    e = stack.exports
    assert set(e) == NAMES
    assert e["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert e["MLFLOW_S3_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert e["KDPRUNE_DVC_REMOTE"] == f"s3://{stack.config()['buckets']['dvc']}"
    recs = stack.records()
    assert sorted(recs) == sorted(SERVICES)
    before = {p.pid for p in stack.processes()}

    again = stack.make("team-up")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == stack.stdout
    assert "already up" in again.stderr
    assert stack.records() == recs
    assert {p.pid for p in stack.processes()} == before

    env = stack.make("team-env")
    assert env.returncode == 0, env.stderr[-3000:]
    assert env.stdout == stack.stdout


def test_a_run_logged_through_the_server_is_in_postgres_and_its_artifact_in_the_bucket(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg2
    from mlflow import MlflowClient

    for name, value in stack.exports.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(stack.exports["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment(f"team-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp_id, run_name="team-probe").info.run_id
    client.log_param(run_id, "prune.amount", "0.5")
    client.log_metric(run_id, "finetuned.accuracy", 0.875, step=1)
    note = tmp_path / "note.txt"
    note.write_bytes(f"artifact of {run_id}\n".encode())
    client.log_artifact(run_id, str(note), artifact_path="reports")
    client.set_terminated(run_id)

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"prune.amount": "0.5"}
    assert got.data.metrics == {"finetuned.accuracy": 0.875}
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/note.txt"]
    fetched = Path(client.download_artifacts(run_id, "reports/note.txt", str(tmp_path)))
    assert fetched.read_bytes() == note.read_bytes()

    cfg = stack.config()
    pg = cfg["postgres"]
    conn = psycopg2.connect(host="127.0.0.1", port=cfg["ports"]["postgres"], user=pg["user"],
                            password=pg["password"], dbname=pg["database"], connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT name, status, experiment_id FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("team-probe", "FINISHED", int(exp_id))]
            cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'prune.amount'", (run_id,))
            assert cur.fetchall() == [("0.5",)]
            cur.execute("SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'finetuned.accuracy'",
                        (run_id,))
            assert cur.fetchall() == [(0.875,)]
    finally:
        conn.close()

    bucket = cfg["buckets"]["mlflow"]
    found = [k for k in keys(stack, bucket) if k.endswith(f"{run_id}/artifacts/reports/note.txt")]
    assert len(found) == 1, keys(stack, bucket)
    body = s3(stack).get_object(Bucket=bucket, Key=found[0])["Body"].read()
    assert body == note.read_bytes()


def test_dvc_push_from_one_clone_and_pull_into_another_go_through_the_bucket(stack: Stack) -> None:
    env = stack.env()
    dvc, git = str(BIN / "dvc"), shutil.which("git")
    assert git, "git is needed"
    first, second = stack.root / "first", stack.root / "second"
    first.mkdir()
    run([git, "init", "-q"], first, env)
    run([dvc, "init", "-q"], first, env)
    payload = os.urandom(256 * 1024) + b"kdprune team stack\n"
    (first / "blob.bin").write_bytes(payload)
    run([dvc, "add", "-q", "blob.bin"], first, env)
    run([git, "add", "-A"], first, env)
    run([git, "commit", "-q", "-m", "blob"], first, env)

    run([PY, str(TEAM_PY), "join"], first, env)
    local = (first / ".dvc" / "config.local").read_text()
    assert "remote = team" in local, local
    assert stack.exports["KDPRUNE_DVC_REMOTE"] in local
    assert f"endpointurl = {stack.exports['MLFLOW_S3_ENDPOINT_URL']}" in local
    assert "config.local" not in run([git, "status", "--porcelain"], first, env).stdout  # the keys stay out of git
    run([dvc, "push"], first, env)

    md5 = hashlib.md5(payload).hexdigest()
    bucket = stack.exports["KDPRUNE_DVC_REMOTE"].removeprefix("s3://")
    stored = [k for k in keys(stack, bucket) if k.endswith(f"{md5[:2]}/{md5[2:]}")]
    assert len(stored) == 1, keys(stack, bucket)
    assert s3(stack).get_object(Bucket=bucket, Key=stored[0])["Body"].read() == payload

    run([git, "clone", "-q", str(first), str(second)], stack.root, env)
    assert not (second / "blob.bin").exists()
    run([PY, str(TEAM_PY), "join"], second, env)
    run([dvc, "pull"], second, env)
    assert (second / "blob.bin").read_bytes() == payload


def test_down_then_up_keeps_the_runs_the_data_and_the_exports(stack: Stack) -> None:
    from mlflow import MlflowClient

    down = stack.make("team-down", timeout=180)
    assert down.returncode == 0, down.stderr[-3000:]
    assert stack.records() == {}
    up = stack.make("team-up")
    assert up.returncode == 0, up.stderr[-3000:]
    assert up.stdout == stack.stdout  # same ports and keys: teammates' exports and joined clones still work
    client = MlflowClient(stack.exports["MLFLOW_TRACKING_URI"])
    probes = [r for e in client.search_experiments() if e.name.startswith("team-")
              for r in client.search_runs([e.experiment_id])]
    assert [r.data.tags["mlflow.runName"] for r in probes] == ["team-probe"]
    assert any(k.startswith("files/") for k in keys(stack, stack.exports["KDPRUNE_DVC_REMOTE"][5:]))


def test_down_stops_every_process_it_started_and_frees_every_port(stack: Stack) -> None:
    recs = stack.records()
    assert sorted(recs) == sorted(SERVICES)
    procs = stack.processes()
    names = " ".join(p.name() for p in procs)
    # the postmaster and its helpers, weed, the MLflow CLI and its uvicorn worker
    assert len(procs) >= 5 and "postgres" in names and "weed" in names, names
    ports = sorted(set(stack.config()["ports"].values()))
    main = [stack.config()["ports"][k] for k in SERVICES]
    assert not any(port_free(p) for p in main)

    down = stack.make("team-down", timeout=180)
    assert down.returncode == 0, down.stderr[-3000:]
    assert down.stdout == ""
    left = [p for p in procs if alive(p)]
    assert left == [], f"left behind: {left}"
    wait_until(lambda: all(port_free(p) for p in ports), 30, f"ports {ports} free")
    assert stack.records() == {}
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{stack.config()['ports']['s3']}.sock"))

    again = stack.make("team-down", timeout=180)
    assert again.returncode == 0 and "nothing to stop" in again.stderr, again.stderr
    gone = stack.make("team-env")
    assert gone.returncode != 0 and gone.stdout == "" and "not up" in gone.stderr
