"""kdprune.forkserver: a later stage runs in a fork of a warm server, indistinguishable from its own
process to DVC (argv, directory, environment, streams, exit status, signals), and never outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from kdprune import forkserver, procs, stage, tracker
from kdprune.switches import SWITCHES, switch

pytestmark = pytest.mark.slow

PROBE = '''\
import os, sys, time
before = sorted(m for m in sys.modules if m.startswith("kdprune"))
preloaded = "sklearn" in sys.modules  # what the server imported ahead of the stages (its third later import)
dynamo = "torch._dynamo" in sys.modules  # (its fifth, which asks tempfile for its folder)
from kdprune import stage


def main():
    import gc, resource, tempfile
    umask = os.umask(0)
    print("pid", os.getpid(), "for", os.environ.get("KDPRUNE_FORKED_FOR"), "umask", oct(umask),
          "nofile", resource.getrlimit(resource.RLIMIT_NOFILE)[0], "frozen", gc.get_freeze_count(),
          "collecting", gc.isenabled(), "sklearn", preloaded, "dynamo", dynamo, "tmp", tempfile.gettempdir(),
          "kdprune", before, flush=True)
    print("cwd", os.getcwd(), "argv", sys.argv[1:], "X", os.environ.get("X"), "stdin", sys.stdin.read().strip())
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "sleep":
        time.sleep(120)
    raise SystemExit(int(sys.argv[1]))


if __name__ == "__main__":
    stage.guard(main)
'''


@pytest.fixture
def probe(tmp_path: Path, services: Path, monkeypatch: pytest.MonkeyPatch):
    """A stage-like script, and a service folder of this test's own, whose server is stopped at the end.
    Its server imports torch alone (KDPRUNE_FORKSERVER=torch): the later stages' imports would be 4 s of
    CPU for each of these servers, which run the probe alone."""
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    monkeypatch.delenv(procs.FORKED_FOR, raising=False)
    monkeypatch.setenv("KDPRUNE_FORKSERVER", "torch")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "work").mkdir()
    yield script
    with pytest.MonkeyPatch.context() as mp:  # this test's own server, whichever folder the test ended on
        mp.setenv("KDPRUNE_SERVICE_DIR", str(services))
        forkserver.stop_all()


@pytest.fixture(scope="module")
def shared_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A service folder the tests that only need a server (any server) share: whichever runs first starts
    it, and torch is imported once for all of them instead of once each."""
    services = tmp_path_factory.mktemp("shared") / "svc"
    yield services
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPRUNE_SERVICE_DIR", str(services))
        forkserver.stop_all()


@pytest.fixture(scope="module")
def default_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A service folder for a default server (KDPRUNE_FORKSERVER=on), which imports every later stage's
    libraries while idle (seconds of CPU): the tests that need one share it."""
    services = tmp_path_factory.mktemp("default") / "svc"
    yield services
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPRUNE_SERVICE_DIR", str(services))
        forkserver.stop_all()


@pytest.fixture
def served(probe: Path, shared_services: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The probe, forked from the shared server."""
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(shared_services))
    return probe


def run(script: Path, *args: str, preexec: Any = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=script.parent / "work", input="from stdin",
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)


def fields(out: str) -> dict[str, str]:
    first = out.splitlines()[0].split()
    return dict(zip(first[::2], first[1::2]))


def test_a_stage_runs_in_a_fork_with_its_own_argv_directory_environment_streams_and_status(probe, services):
    first = run(probe, "3")
    assert list((services / "fork").glob("*.sock")), "the first stage started no server"
    assert first.returncode == 3 and fields(first.stdout)["for"] != "None"  # handed to the server it started
    assert first.stderr == "to stderr\n"

    second = run(probe, "4", X="hello")
    assert second.returncode == 4, second.stderr
    assert fields(second.stdout)["for"] != "None"  # the pid of the process that handed it over
    assert fields(second.stdout)["pid"] != fields(second.stdout)["for"]
    assert "kdprune []" in second.stdout  # no kdprune module inherited: an edited one is imported afresh
    assert f"cwd {probe.parent / 'work'} argv ['4'] X hello stdin from stdin" in second.stdout
    assert second.stderr == "to stderr\n"


def test_between_stages_a_server_imports_what_later_stages_need_unless_it_is_to_import_torch_alone(
        probe, services, default_services, monkeypatch):
    """The default server, idle, imports the later stages' libraries (scikit-learn among the first); one
    started earlier with KDPRUNE_FORKSERVER=torch, in a folder of its own, has imported none by then.
    Forks report what they inherited."""
    folders = {"torch": services / "torch", "on": default_services}

    def fork(mode: str) -> dict[str, str]:
        out = run(probe, "0", KDPRUNE_FORKSERVER=mode, KDPRUNE_SERVICE_DIR=str(folders[mode]))
        assert out.returncode == 0, out.stderr
        return fields(out.stdout)

    try:
        for mode in folders:  # each run starts its server
            fork(mode)
        deadline = time.monotonic() + 120
        while (forked := fork("on"))["sklearn"] != "True":
            assert forked["for"] != "None" and time.monotonic() < deadline
            time.sleep(0.3)
        forked = fork("torch")
        assert forked["for"] != "None" and forked["sklearn"] == "False"
    finally:
        monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(folders["torch"]))
        forkserver.stop_all()


def test_a_fork_makes_its_temporary_files_where_its_own_tmpdir_says(probe, default_services, tmp_path):
    """The default server imports torch._dynamo between stages, which asks tempfile for its folder once: a
    fork had kept the server's answer, from the TMPDIR of the stage that started it, and ignored its own."""
    own = tmp_path / "own-tmp"
    own.mkdir()
    server = {"KDPRUNE_FORKSERVER": "on", "KDPRUNE_SERVICE_DIR": str(default_services)}
    deadline = time.monotonic() + 120
    while (forked := fields(run(probe, "0", **server).stdout))["dynamo"] != "True":
        assert forked["for"] != "None" and time.monotonic() < deadline
        time.sleep(0.3)
    forked = fields(run(probe, "0", **server, TMPDIR=str(own)).stdout)
    assert forked["for"] != "None" and forked["tmp"] == str(own)


def test_a_fork_has_the_umask_of_the_process_it_stands_for(served):
    """The server keeps the umask it started with (the first run's, this process's); each fork takes its
    caller's, and the next fork has its own again."""
    ours = os.umask(0o022)
    os.umask(ours)
    other = 0o077 if ours != 0o077 else 0o027
    runs = [run(served, "0"), run(served, "0", preexec=lambda: os.umask(other)), run(served, "0")]
    assert all(fields(r.stdout)["for"] != "None" for r in runs)
    assert [fields(r.stdout)["umask"] for r in runs] == [oct(ours), oct(other), oct(ours)]


def test_a_fork_collects_its_own_garbage_but_never_scans_what_the_server_imported(served):
    """The server's imports (torch's hundreds of thousands of objects) are frozen: a fork's garbage
    collections (on, as in any process) pass them over, and touch none of the pages it shares with the
    server. A stage in a process of its own freezes nothing."""
    forked = fields(run(served, "0").stdout)
    assert forked["for"] != "None" and forked["collecting"] == "True"
    assert int(forked["frozen"]) > 100_000, forked
    own = fields(run(served, "0", KDPRUNE_FORKSERVER="off").stdout)
    assert own["for"] == "None" and own["collecting"] == "True" and own["frozen"] == "0"


def test_a_stage_with_other_limits_or_privileges_is_not_forked_from_a_server_without_them(probe, services):
    """A fork has the server's rlimits, capabilities, cgroup: a stage run under `ulimit -n 512` (or
    setpriv, taskset, nice) gets a server started under the same, never one started without."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    run(probe, "0")
    assert len(list((services / "fork").glob("*.sock"))) == 1
    limited = run(probe, "0", preexec=lower)
    assert fields(limited.stdout)["nofile"] == "512"
    assert len(list((services / "fork").glob("*.sock"))) == 2  # a server of its own, started now
    again = run(probe, "0", preexec=lower)
    assert fields(again.stdout)["for"] != "None" and fields(again.stdout)["nofile"] == "512"


@pytest.mark.parametrize("name", ["ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS"])
def test_a_stage_choosing_other_kernels_gets_a_server_of_its_own(name, services, monkeypatch):
    """torch's vector kernels, oneDNN's, MKL's and the thread pools are chosen once per process from these
    variables (the first three each changed the teacher's bytes on an AVX2 machine): a fork of a server
    started without the stage's value could compute with the server's. Any other variable is the fork's
    own and keeps the server."""
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    monkeypatch.delenv(name, raising=False)
    plain = forkserver.server_path()
    monkeypatch.setenv("KDPRUNE_SOMETHING_ELSE", "1")
    assert forkserver.server_path() == plain
    monkeypatch.setenv(name, "2" if name.startswith("OMP") else "avx2")
    assert forkserver.server_path() != plain


def test_a_torch_only_server_is_never_the_one_a_default_stage_finds(services, monkeypatch):
    """A torch-only server left by a stage run by hand would otherwise serve the next `dvc repro` for
    minutes, every stage importing what the default server preloads."""
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    monkeypatch.delenv("KDPRUNE_FORKSERVER", raising=False)
    default = forkserver.server_path()
    monkeypatch.setenv("KDPRUNE_FORKSERVER", "on")
    assert forkserver.server_path() == default
    monkeypatch.setenv("KDPRUNE_FORKSERVER", "torch")
    assert forkserver.server_path() != default


def test_an_empty_switch_is_its_default(services, monkeypatch):
    """`KDPRUNE_FORKSERVER= dvc repro` means the default, as an empty KDPRUNE_TRACKING or KDPRUNE_SHARE
    does: it had stopped every stage (`expected one of on, torch, off, got ''`)."""
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    monkeypatch.delenv("KDPRUNE_FORKSERVER", raising=False)
    default = forkserver.server_path()
    for name in SWITCHES:
        monkeypatch.setenv(name, "")
    stage.check_environment()
    assert forkserver.enabled() and forkserver.server_path() == default
    assert {name: switch(name) for name in SWITCHES} == {
        "KDPRUNE_TRACKING": "on", "KDPRUNE_SHARE": "1", "KDPRUNE_FORKSERVER": "on"}


def test_a_package_installed_or_removed_since_a_warm_start_began_gets_a_new_one(tmp_path, services, monkeypatch):
    """The fork server and the zygote stay minutes between stages, holding the packages they imported: once
    an install or a removal has added or taken an entry (pip's and uv's `*.dist-info`) in the
    interpreter's site-packages, a stage is served by a new one, never by one holding the old packages. So
    is a stage by the MLflow service of its store (it had kept the MLflow it imported)."""
    import sysconfig

    from kdprune import zygote

    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(services))
    site = tmp_path / "site-packages"
    site.mkdir()
    paths = {**sysconfig.get_paths(), "purelib": str(site), "platlib": str(site)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda *args, **kwargs: paths)
    def keys() -> tuple[Path, Path, Path]:
        return (forkserver.server_path(), zygote.socket_path(dict(os.environ)),
                tracker.service_socket("sqlite:///m.db", "kdprune"))

    os.utime(site, ns=(0, 10**18))  # the last install, in 2001
    before = keys()
    with monkeypatch.context() as mp:  # a service's sys.path is not its caller's: the zygote is theirs both
        mp.setattr(sys, "path", [*sys.path, str(tmp_path)])
        assert zygote.socket_path(dict(os.environ)) == before[1]
    (site / "torch-9.9.dist-info").mkdir()  # an install, now
    installed = keys()
    assert all(now != then for now, then in zip(installed, before))
    os.utime(site, ns=(0, 10**18))
    assert keys() == before
    (site / "torch-9.9.dist-info").rmdir()  # a removal, now
    assert all(now != then for now, then in zip(keys(), before))


@pytest.mark.parametrize("server", ["on", "off"])
def test_a_warm_idle_that_is_no_number_of_seconds_stops_the_stage_with_one_line(probe, services, server):
    """With the fork server off too: the zygote of the stage's MLflow service reads it."""
    out = run(probe, "0", KDPRUNE_WARM_IDLE="5 min", KDPRUNE_FORKSERVER=server)
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", "error: KDPRUNE_WARM_IDLE: expected a number of seconds, got '5 min'\n")
    assert not (services / "fork").exists() or not list((services / "fork").glob("*.sock"))


@pytest.mark.parametrize("name, value, message", [
    ("KDPRUNE_TRACKING", "false", "KDPRUNE_TRACKING: expected on or off, got 'false'"),
    ("KDPRUNE_SHARE", "off", "KDPRUNE_SHARE: expected 1 or 0, got 'off'"),
    ("KDPRUNE_TIMINGS", "no/such/folder/t.jsonl", "KDPRUNE_TIMINGS: no/such/folder/t.jsonl: expected a file in an "
                                                  "existing folder"),
])
def test_a_switch_or_a_timings_file_that_cannot_be_stops_the_stage_with_one_line(probe, services, name, value,
                                                                                   message):
    """Each value the stage does not know is named before any work: `KDPRUNE_TRACKING=false` left tracking
    on, `KDPRUNE_SHARE=off` sharing, and a timings file in no folder failed the stage after its work."""
    out = run(probe, "0", **{name: value})
    assert (out.returncode, out.stdout, out.stderr) == (2, "", f"error: {message}\n")
    assert not (services / "fork").exists() or not list((services / "fork").glob("*.sock"))


def test_a_fork_server_mode_that_is_no_mode_stops_the_stage_with_one_line(probe, services):
    out = run(probe, "0", KDPRUNE_FORKSERVER="Torch")
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", "error: KDPRUNE_FORKSERVER: expected on, torch or off, got 'Torch'\n")
    assert not (services / "fork").exists() or not list((services / "fork").glob("*.sock"))


def test_a_service_folder_too_long_for_its_sockets_stops_the_stage_with_one_line(probe, services, monkeypatch):
    """Linux binds a Unix socket to a path of at most 107 bytes: in the longest folder that fits, a stage
    is forked from a server listening at exactly 107; one byte more stops the stage before any work, with
    the server off too (its MLflow service listens there), where each stage waited for a server that
    could not start and then ran on its own."""
    room = tracker.SOCKET_PATH - tracker.SOCKET_NAME - len(os.fsencode(services)) - 1
    if room < 1:
        pytest.skip(f"the temporary folder {services} leaves no room below the limit")
    longest, too_long = services / ("x" * room), services / ("x" * (room + 1))
    try:
        fits = run(probe, "0", KDPRUNE_SERVICE_DIR=str(longest))
        assert fits.returncode == 0 and fields(fits.stdout)["for"] != "None", fits.stderr
        assert [len(os.fsencode(sock)) for sock in (longest / "fork").glob("*.sock")] == [107]
    finally:
        monkeypatch.setenv("KDPRUNE_SERVICE_DIR", str(longest))
        forkserver.stop_all()
    for server in ("on", "off"):
        out = run(probe, "0", KDPRUNE_SERVICE_DIR=str(too_long), KDPRUNE_FORKSERVER=server)
        assert (out.returncode, out.stdout, out.stderr) == (2, "", f"error: KDPRUNE_SERVICE_DIR: {too_long} is too "
                                                            "long for the sockets in it (at most 76 bytes as an "
                                                            "absolute path, got 77)\n")
    assert not too_long.exists()


def test_a_service_folder_that_cannot_be_made_stops_a_stage_that_needs_it_with_one_line(probe, services):
    """A stage to be forked needs it for its server's socket (it stopped with a traceback); one run in its
    own process that tracks nothing needs none, and runs."""
    (services / "a file").write_text("")
    folder = services / "a file/svc"
    out = run(probe, "0", KDPRUNE_SERVICE_DIR=str(folder))
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", f"error: KDPRUNE_SERVICE_DIR: {folder}: Not a directory\n")
    alone = run(probe, "0", KDPRUNE_SERVICE_DIR=str(folder), KDPRUNE_FORKSERVER="off")
    assert alone.returncode == 0 and fields(alone.stdout)["for"] == "None", alone.stderr
    (services / "held").mkdir()  # a folder there that cannot hold the server's (a file in its place)
    (services / "held/fork").write_text("")
    out = run(probe, "0", KDPRUNE_SERVICE_DIR=str(services / "held"))
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", f"error: KDPRUNE_SERVICE_DIR: {services / 'held/fork'}: File exists\n")


def test_a_service_folder_another_user_could_listen_in_stops_the_stage_with_one_line(probe, services):
    """A stage hands its environment (the store's keys) and its terminal to the socket it finds in the folder:
    one that others may write in, or that another user made (/tmp/kdprune-<uid> is anyone's to make first
    after a reboot), could hold theirs. Such a folder was used, and `fork/` made in it."""
    shared = services / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = run(probe, "0", KDPRUNE_SERVICE_DIR=str(shared))
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", f"error: KDPRUNE_SERVICE_DIR: {shared}: others may write in it (mode 777) and put a socket of "
               "theirs there; chmod go-w it, or use another folder\n")
    assert list(shared.iterdir()) == []
    if os.geteuid() == 0:  # (only root can give a folder away)
        theirs = services / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
        out = run(probe, "0", KDPRUNE_SERVICE_DIR=str(theirs))
        assert (out.returncode, out.stdout, out.stderr) == (
            2, "", f"error: KDPRUNE_SERVICE_DIR: {theirs}: owned by another user (uid 65534), who could listen "
                   "in it for this stage's environment and terminal; use a folder of your own\n")
        assert list(theirs.iterdir()) == []


def test_a_relative_service_folder_is_the_one_in_the_folder_it_was_named_from(services, monkeypatch):
    """The fork server and the MLflow service run in their own folder: a relative path is made absolute
    where the stage was started (a server bound it under its own, and no stage ever found it)."""
    monkeypatch.chdir(services)
    monkeypatch.setenv("KDPRUNE_SERVICE_DIR", "svc")
    assert tracker.service_dir() == services / "svc" and (services / "svc").is_dir()
    assert forkserver.server_path().parent == services / "svc/fork"


def test_the_server_off_runs_every_stage_in_its_own_process(served):
    assert fields(run(served, "0").stdout)["for"] != "None"  # a server listens, and forks
    off = run(served, "0", KDPRUNE_FORKSERVER="off")
    assert off.returncode == 0 and fields(off.stdout)["for"] == "None"


def _fork_of(client: subprocess.Popen, out: Path) -> int:
    deadline = time.monotonic() + 120
    while "pid" not in out.read_text():
        assert client.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)
    found = fields(out.read_text())
    assert found["for"] == str(client.pid)
    return int(found["pid"])


def _gone(pid: int, timeout: float = 10) -> bool:
    """Not running (gone, or a zombie its server has yet to reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 130), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_signal_to_the_stage_process_ends_its_fork(served, tmp_path, signum, status):
    """SIGTERM and SIGINT are forwarded; SIGKILL leaves nothing to forward, and the fork, seeing the
    connection end, stops as if signalled. Either way it closes as a stage does: no output written."""
    probe = served
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as o, err.open("w") as e:
        client = subprocess.Popen([sys.executable, str(probe), "sleep"], cwd=probe.parent / "work", stdout=o,
                                  stderr=e, stdin=subprocess.DEVNULL)
        fork = _fork_of(client, out)
        client.send_signal(signum)
        assert client.wait(timeout=30) == status
    assert _gone(fork)
    assert "error: interrupted; no output written" in err.read_text()


def test_a_stopped_server_removes_its_socket_and_the_next_stage_starts_another(probe, services):
    first = run(probe, "0")
    assert len(forkserver.stop_all()) == 1  # and it waited until the server was gone
    assert not list((services / "fork").glob("*.sock"))
    again = run(probe, "0")
    assert again.returncode == 0 and fields(again.stdout)["for"] != "None"
    assert fields(again.stdout)["pid"] != fields(first.stdout)["pid"]
    assert len(list((services / "fork").glob("*.sock"))) == 1


def test_ctrl_c_while_a_new_server_imports_torch_ends_the_stage(probe, services, tmp_path):
    """The first stage waits for the server it started to import torch (seconds): a Ctrl-C then ends it
    as one during the stage does, and nothing runs on (a fork, if the server made one, ends too)."""
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as o, err.open("w") as e:
        client = subprocess.Popen([sys.executable, str(probe), "sleep"], cwd=probe.parent / "work", stdout=o,
                                  stderr=e, stdin=subprocess.DEVNULL, preexec_fn=_as_a_terminal_would)
        deadline = time.monotonic() + 60
        while not list((services / "fork").glob("*.sock")):
            assert client.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        client.send_signal(signal.SIGINT)
        try:
            status = client.wait(timeout=60)
        except subprocess.TimeoutExpired:
            seen = _signal_state(client.pid)
            client.kill()
            client.wait()
            pytest.fail(f"the stage ran on after Ctrl-C; {seen}; out: {out.read_text()!r}; err: {err.read_text()!r}")
        assert status == 130, err.read_text()
    assert "error: interrupted; no output written" in err.read_text()
    if "pid" in out.read_text():
        assert _gone(int(fields(out.read_text())["pid"]))


def _as_a_terminal_would() -> None:
    """A foreground process's signals: Ctrl-C delivered, nothing blocked (whatever the test worker has)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _signal_state(pid: int) -> str:
    """What /proc says of a process's signals and state (for a failure's message)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as e:
        return f"no /proc/{pid}: {e}"
    return ", ".join(line for line in lines if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))


def test_a_signal_sent_the_moment_a_fork_exists_is_not_lost(served, shared_services, tmp_path):
    """The server ignores SIGINT (a Ctrl-C in a terminal is for the stages), and a fork inherits that until
    it sets the stage's handlers: it holds its signals until then, so a Ctrl-C forwarded the moment the
    stage's process learns the fork's pid still ends it (here, twenty times over, as fast as we can)."""
    import json
    import socket

    run(served, "0")  # the shared server is up
    (path,) = (shared_services / "fork").glob("*.sock")
    request = json.dumps({"argv": [str(served), "sleep"], "cwd": str(served.parent / "work"), "env": dict(os.environ),
                          "path": sys.path, "umask": 0o022, "client": os.getpid()}).encode()
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, open(os.devnull) as stdin, \
                (tmp_path / "out").open("w") as out:
            sock.connect(str(path))
            sock.settimeout(60)
            socket.send_fds(sock, [forkserver.HEADER.pack(len(request)) + request],
                            [stdin.fileno(), out.fileno(), out.fileno()])
            reply = sock.makefile("rb")
            pid = json.loads(reply.readline())["pid"]
            os.kill(pid, signal.SIGINT)
            assert json.loads(reply.readline())["status"] == 130
