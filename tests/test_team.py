"""The team stack (`make team-up` / `team-join` / `team-down`, scripts/team.py) with real parts: PostgreSQL,
SeaweedFS's S3 gateway and an MLflow server on free ports in a temporary folder. A run logged through the
server is read back from PostgreSQL and its artifact from the bucket; `dvc push` from one throw-away repo and
`dvc pull` into a clone of it go through the DVC bucket; two clones of the tiny pipeline share the stack as
README "Working as a team" says (the second pulls and recomputes nothing; its runs link to the first's by
fingerprint); team-down leaves no process and no port behind.

The tests share one stack (a module fixture). Two take it down; whichever test comes next finds it
brought back up by its fixture, on the same ports and keys and with the same data, so they run in any
order and each makes the runs and objects it checks."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
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
from urllib.parse import quote

import pytest
import yaml

from tests.conftest import REPO, tree_bytes
from tests.test_dvc import ALL, GIT, RAN, clone, make_project, sh

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
def team_stack() -> Iterator[Stack]:
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


@pytest.fixture
def stack(team_stack: Stack) -> Stack:
    """The module's stack, up: brought back (same exports) where an earlier test took it down."""
    if not team_stack.records():
        up = team_stack.make("team-up")
        assert up.returncode == 0 and up.stdout == team_stack.stdout, up.stderr[-3000:]
    return team_stack


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


def test_a_team_config_that_cannot_be_read_is_one_line_naming_it(tmp_path: Path) -> None:
    """A team.json cut short (a full disk) gave `team status` a JSONDecodeError's traceback."""
    command = "status"
    root = tmp_path / "team"
    root.mkdir()
    (root / "team.json").write_text('{"ports": {"mlflow": 50')
    res = subprocess.run([PY, str(TEAM_PY), command], env=base_env(TEAM_DIR=str(root)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [f"team {command}: error: {root / 'team.json'}: cannot read (Expecting "
                                       f"',' delimiter: line 1 column 24 (char 23)); restore it, or remove {root} "
                                       "(the stack's data with it) for a new stack"], res.stderr


def test_a_team_folder_another_user_could_write_in_is_refused_with_one_line(tmp_path: Path) -> None:
    """It holds the stack's passwords and keys: its owner, or anyone who may write in it, could swap in a
    team.json whose passwords they know, or a link where ours is written (`up` wrote through one)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cases = [(shared, "others may write in it (mode 777); chmod go-w it, or use another folder")]
    if os.geteuid() == 0:  # (only root can give a folder away)
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        cases.append((theirs, "owned by another user (uid 65534); use a folder of your own"))
    for root, why in cases:
        res = subprocess.run([PY, str(TEAM_PY), "status"], env=base_env(TEAM_DIR=str(root)), capture_output=True,
                             text=True, timeout=60)
        assert (res.returncode, res.stdout, res.stderr) == (1, "", f"team status: error: TEAM_DIR {root}: {why}\n")
        assert list(root.iterdir()) == []


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


@pytest.mark.parametrize("url", ["s3://", "s3:///data", "https://bucket"])
def test_join_names_a_remote_url_without_a_bucket(url: str, tmp_path: Path) -> None:
    """`s3://$BUCKET` with BUCKET unset: DVC refused the remote, and the error blamed .dvc/config.local,
    a file that was not there."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    env = base_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:9",
                   AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", KDPRUNE_DVC_REMOTE=url)
    res = subprocess.run([PY, str(TEAM_PY), "join"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.splitlines() == [
        f"team join: error: KDPRUNE_DVC_REMOTE={url!r} is not an s3://<bucket>[/<path>] URL"]
    assert list((repo / ".dvc").iterdir()) == []


def test_join_without_an_endpoint_points_dvc_at_aws_s3_itself(tmp_path: Path) -> None:
    """MLFLOW_S3_ENDPOINT_URL is unset for AWS S3 itself (docs/team.md): the join writes the remote with no
    endpointurl, so DVC (and boto) use AWS's own."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    env = base_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                   KDPRUNE_DVC_REMOTE="s3://bucket")
    res = run([PY, str(TEAM_PY), "join"], repo, env)
    assert "(endpoint AWS S3)" in res.stdout + res.stderr
    local = (repo / ".dvc/config.local").read_text()
    assert "url = s3://bucket" in local and "access_key_id = k" in local and "endpointurl" not in local


def test_join_writes_what_dvc_remote_would_and_refuses_a_bad_config_whole(tmp_path: Path) -> None:
    """One edit of .dvc/config.local through DVC's config code: the bytes `dvc remote add --local --default`
    and `dvc remote modify --local` (x3) write, and with a config DVC refuses, one line naming that file
    (this clone's own, or the repository's) and no change."""
    secret = "s3cr3t-not-to-print"
    env = base_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:9",
                   AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY=secret, KDPRUNE_DVC_REMOTE="s3://bucket")
    dvc = str(Path(PY).parent / "dvc")
    joined, by_hand = tmp_path / "joined", tmp_path / "by-hand"
    for repo in (joined, by_hand):
        (repo / ".dvc").mkdir(parents=True)  # all `dvc remote --local` and the join need of a repository
    run([PY, str(TEAM_PY), "join"], joined, env)
    for args in (["add", "--local", "--default", "team", "s3://bucket"],
                 ["modify", "--local", "team", "endpointurl", "http://127.0.0.1:9"],
                 ["modify", "--local", "team", "access_key_id", "k"],
                 ["modify", "--local", "team", "secret_access_key", secret]):
        run([dvc, "remote", *args], by_hand, env)
    local = (joined / ".dvc/config.local").read_text()
    assert local == (by_hand / ".dvc/config.local").read_text()
    assert "remote = team" in local and "url = s3://bucket" in local
    assert (joined / ".dvc/config.local").stat().st_mode & 0o777 == 0o600  # its keys: it was 0644, anyone's
    # joining again replaces the remote whole, as `dvc remote add --force` does: a key added since is gone
    (joined / ".dvc/config.local").write_text(local + "    region = eu-west-1\n")  # the team section is last
    (joined / ".dvc/config.local").chmod(0o644)
    run([PY, str(TEAM_PY), "join"], joined, env)
    assert (joined / ".dvc/config.local").read_text() == local
    assert (joined / ".dvc/config.local").stat().st_mode & 0o777 == 0o600

    bad = "[core]\n    no_such_option = 1\n"

    def refused(culprit: str) -> None:
        res = subprocess.run([PY, str(TEAM_PY), "join"], cwd=joined, env=env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 1 and res.stdout == ""
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and f"{joined / culprit}: " in lines[0] and "no_such_option" in lines[0], lines
        assert secret not in res.stderr

    (joined / ".dvc/config.local").write_text(bad)
    refused(".dvc/config.local")
    assert (joined / ".dvc/config.local").read_text() == bad
    (joined / ".dvc/config.local").unlink()  # the repository's own config refused: that file is named
    (joined / ".dvc/config").write_text(bad)
    refused(".dvc/config")
    assert not (joined / ".dvc/config.local").exists()


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

    with postgres(stack) as cur:
        cur.execute("SELECT name, status, experiment_id FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("team-probe", "FINISHED", int(exp_id))]
        cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'prune.amount'", (run_id,))
        assert cur.fetchall() == [("0.5",)]
        cur.execute("SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'finetuned.accuracy'",
                    (run_id,))
        assert cur.fetchall() == [(0.875,)]
    # and read straight from the database, as a stage pointed at it reads, by the URI MLflow's docs write:
    # postgresql://, which SQLAlchemy 2.1 reads as psycopg 3 (it had failed: "No module named 'psycopg'")
    cfg, pg = stack.config(), stack.config()["postgres"]
    direct = MlflowClient(f"postgresql://{quote(pg['user'])}:{quote(pg['password'], safe='')}@127.0.0.1:"
                          f"{cfg['ports']['postgres']}/{pg['database']}")
    assert direct.get_run(run_id).data.metrics == {"finetuned.accuracy": 0.875}

    bucket = stack.config()["buckets"]["mlflow"]
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


def test_down_then_up_keeps_the_runs_the_data_and_the_exports(stack: Stack, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    for name, value in stack.exports.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(stack.exports["MLFLOW_TRACKING_URI"])
    name = f"keep-{uuid.uuid4().hex[:8]}"
    run_id = client.create_run(client.create_experiment(name), run_name=name).info.run_id
    (tmp_path / "note.txt").write_text(name)
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run_id)
    bucket = stack.exports["KDPRUNE_DVC_REMOTE"].removeprefix("s3://")
    s3(stack).put_object(Bucket=bucket, Key=f"files/md5/{name}", Body=name.encode())

    down = stack.make("team-down", timeout=180)
    assert down.returncode == 0, down.stderr[-3000:]
    assert stack.records() == {}
    up = stack.make("team-up")
    assert up.returncode == 0, up.stderr[-3000:]
    assert up.stdout == stack.stdout  # same ports and keys: teammates' exports and joined clones still work
    client = MlflowClient(stack.exports["MLFLOW_TRACKING_URI"])
    kept = client.get_run(run_id)
    assert (kept.info.status, kept.info.run_name) == ("FINISHED", name)
    assert Path(client.download_artifacts(run_id, "note.txt", str(tmp_path / "back"))).read_text() == name
    assert s3(stack).get_object(Bucket=bucket, Key=f"files/md5/{name}")["Body"].read() == name.encode()


# -- the acceptance: two clones of the pipeline on one stack --------------------------------------------------

# the stages that open a stage run (validate opens none, evaluate the summary run), and who makes what
STAGE_RUNS = [s for s in ALL if s not in ("validate", "evaluate")]
MAKER = {"data": "prepare", "teacher": "train_teacher", "soft_labels": "soft_labels",
         "student_scratch": "train_scratch", "student": "train_student", "scores": "score", "pruned": "prune",
         "finetuned": "finetune"}
MODELS = {"train_teacher": "teacher", "train_scratch": "student_scratch", "train_student": "student",
          "prune": "pruned", "finetune": "finetuned"}  # the stage -> the model it logs, in models/<name>


def assert_linked(run: Any, made: dict[str, Any]) -> None:
    """Every input of `run` is the output of the run `made` holds for its maker, and `run` names that run
    (`pipeline.upstream.<stage>`, or `pipeline.run.<stage>` on a summary): lineage by fingerprint."""
    tags = run.data.tags
    link = "pipeline.run." if tags["pipeline.kind"] == "summary" else "pipeline.upstream."
    inputs = {k.removeprefix("pipeline.input."): v for k, v in tags.items() if k.startswith("pipeline.input.")}
    assert inputs, tags
    for role, fingerprint in inputs.items():
        maker = made[MAKER[role]]
        assert maker.data.tags["pipeline.output"] == fingerprint, (tags["pipeline.stage"], role)
        assert tags[link + MAKER[role]] == maker.info.run_id, (tags["pipeline.stage"], role)


def share_through_the_stack(stack: Stack, a: Path, b: Path) -> None:
    """The README's recipe on two clones: A joins, reproduces, commits and pushes outputs and run-cache; B, a
    git clone of A with no DVC cache, joins and pulls (its repro then runs nothing) and runs an experiment.

    Joining runs `python scripts/team.py join` in the clone: `make team-join`'s own recipe, which the Makefile
    runs after making sure of the repo's .venv; the throw-away clones have no Makefile and no .venv."""
    env = stack.env(PYTHONUNBUFFERED="1")
    a.mkdir()
    make_project(a)
    run([PY, str(TEAM_PY), "join"], a, env)
    assert RAN.findall(sh(["dvc", "repro"], a, env).stdout) == ALL
    sh(["git", "add", "-A"], a, env)
    sh([*GIT, "commit", "-qm", "repro"], a, env)
    assert "config.local" not in sh(["git", "show", "--stat", "HEAD"], a, env).stdout  # the keys stay out of git
    sh(["dvc", "push"], a, env)
    sh(["dvc", "push", "--run-cache"], a, env)
    bucket = stack.exports["KDPRUNE_DVC_REMOTE"].removeprefix("s3://")
    dvc_keys = keys(stack, bucket)
    assert any(k.startswith("files/md5/") for k in dvc_keys)
    # docs/team.md: `dvc push --run-cache`, so a stage computed once, on any machine, is never computed
    # again: an entry in the bucket's runs/ for every stage that computes (validate's marker persists,
    # which DVC never run-caches)
    client = s3(stack)
    cached = {re.search(r"stages/(\w+)\.py", yaml.safe_load(client.get_object(Bucket=bucket, Key=k)["Body"].read())
                        ["cmd"]).group(1) for k in dvc_keys if k.startswith("runs/")}
    assert cached >= set(STAGE_RUNS), sorted(cached)

    clone(a, b, shared_cache=False)  # a fresh machine: git only, no DVC cache, no outputs
    assert not (b / ".dvc/cache").exists() and not (b / "models/teacher").exists()
    run([PY, str(TEAM_PY), "join"], b, env)
    sh(["dvc", "pull"], b, env)
    assert tree_bytes(b / "models") == tree_bytes(a / "models")
    again = sh(["dvc", "repro"], b, env).stdout
    assert RAN.findall(again) == [] and "Data and pipelines are up to date" in again, again
    exp = sh(["dvc", "exp", "run", "-S", "prune.amount=0.7"], b, env).stdout
    assert RAN.findall(exp) == ["validate", "prune", "finetune", "evaluate"], exp


def stage_and_summary_runs(runs: list[Any]) -> tuple[dict[str, Any], Any]:
    """{stage: run} of one pipeline execution's stage runs (one each), and its one summary run."""
    stages = [r for r in runs if r.data.tags["pipeline.kind"] == "stage"]
    summaries = [r for r in runs if r.data.tags["pipeline.kind"] == "summary"]
    assert len(summaries) == 1, [r.info.run_name for r in summaries]
    by_stage = {r.data.tags["pipeline.stage"]: r for r in stages}
    assert len(by_stage) == len(stages), sorted(r.data.tags["pipeline.stage"] for r in stages)
    return by_stage, summaries[0]


@contextlib.contextmanager
def postgres(stack: Stack) -> Iterator[Any]:
    """A cursor on the MLflow server's own PostgreSQL database, with the stack's credentials."""
    import psycopg2

    cfg = stack.config()
    pg = cfg["postgres"]
    conn = psycopg2.connect(host="127.0.0.1", port=cfg["ports"]["postgres"], user=pg["user"],
                            password=pg["password"], dbname=pg["database"], connect_timeout=10)
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def assert_runs_in_postgres(stack: Stack, experiment_id: str, runs: list[Any]) -> None:
    """The runs the client reads are the rows of the server's PostgreSQL, all FINISHED."""
    with postgres(stack) as cur:
        cur.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s", (int(experiment_id),))
        assert sorted(cur.fetchall()) == sorted((r.info.run_id, "FINISHED") for r in runs)


def assert_models_in_the_bucket(stack: Stack, logged: list[Any], stage_runs: dict[str, Any], summary: Any,
                                root: Path) -> None:
    """Each model a stage run logged is in the MLflow bucket under its model id, the same ONNX graph as the
    clone's models/<name>/model.onnx; the summary run's report is there under the run's artifacts."""
    import onnx

    bucket = stack.config()["buckets"]["mlflow"]
    stored, client = keys(stack, bucket), s3(stack)
    for stage, r in stage_runs.items():
        if stage not in MODELS:
            continue
        mine = [m for m in logged if m.source_run_id == r.info.run_id]
        assert [m.name for m in mine] == [MODELS[stage]], stage
        files = [k for k in stored if mine[0].model_id in k]
        assert any(k.endswith("/MLmodel") for k in files), (stage, files)
        graph = [k for k in files if k.endswith("/model.onnx")]
        assert len(graph) == 1, (stage, files)
        body = client.get_object(Bucket=bucket, Key=graph[0])["Body"].read()
        here = onnx.load(str(root / "models" / MODELS[stage] / "model.onnx"))
        assert onnx.load_from_string(body).SerializeToString() == here.SerializeToString(), stage
    report = [k for k in stored if k.endswith(f"{summary.info.run_id}/artifacts/comparison.md")]
    assert len(report) == 1, report
    body = client.get_object(Bucket=bucket, Key=report[0])["Body"].read()
    assert body == (root / "reports/comparison.md").read_bytes()


def test_two_clones_share_the_stack_and_the_second_recomputes_nothing(stack: Stack) -> None:
    """The team acceptance, on the tiny preset: B pulls what A computed and recomputes nothing; every run of
    both is FINISHED in PostgreSQL; B's experiment links to A's runs by fingerprint; every logged model is in
    the MLflow bucket."""
    from mlflow import MlflowClient

    a, b = stack.root / "clone-a", stack.root / "clone-b"
    share_through_the_stack(stack, a, b)

    client = MlflowClient(stack.exports["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name("kdprune").experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    assert [(r.data.tags.get("pipeline.stage"), r.info.status) for r in runs if r.info.status != "FINISHED"] == []
    assert_runs_in_postgres(stack, experiment_id, runs)
    of_b = [r for r in runs if r.data.tags.get("dvc.exp_name")]  # B's experiment names its runs
    assert len({r.data.tags["dvc.exp_name"] for r in of_b}) == 1
    a_stage, a_summary = stage_and_summary_runs([r for r in runs if not r.data.tags.get("dvc.exp_name")])
    b_stage, b_summary = stage_and_summary_runs(of_b)
    assert sorted(a_stage) == sorted(STAGE_RUNS)
    assert sorted(b_stage) == ["finetune", "prune"]
    assert b_stage["prune"].data.params["prune.amount"] == "0.7" != a_stage["prune"].data.params["prune.amount"]
    assert b_summary.data.params["prune.amount"] == "0.7"

    for stage, r in a_stage.items():
        if stage != "prepare":  # prepare reads only the raw data, which no run made
            assert_linked(r, a_stage)
        assert r.data.tags["mlflow.parentRunId"] == a_summary.info.run_id
    assert_linked(a_summary, a_stage)
    for r in (*b_stage.values(), b_summary):
        assert_linked(r, {**a_stage, **b_stage})
    assert all(r.data.tags["mlflow.parentRunId"] == b_summary.info.run_id for r in b_stage.values())
    upstream = {k.split(".", 2)[2]: v for k, v in b_stage["prune"].data.tags.items()
                if k.startswith("pipeline.upstream.")}
    assert upstream == {s: a_stage[s].info.run_id for s in ("prepare", "train_teacher", "soft_labels",
                                                             "train_student", "score")}

    logged = client.search_logged_models([experiment_id], max_results=100)
    assert len(logged) == 7  # A's five models, B's pruned and fine-tuned
    assert_models_in_the_bucket(stack, logged, a_stage, a_summary, a)
    assert_models_in_the_bucket(stack, logged, b_stage, b_summary, b)


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
