"""Where runs go: the tracking URI, the experiment, a store opened once under a lock, and calls that
survive a short outage of the server but not a long one."""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from kdprune.errors import TrackingError
from kdprune.files import write_atomic

EXPERIMENT = "kdprune"
_SQLITE = re.compile(r"^sqlite(\+\w+)?://")
_EXPS_MARK = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
T = TypeVar("T")
RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds between attempts of one call: a restart of the server survives


def configure() -> None:
    """MLflow's client settings for a pipeline: a server that is down fails a call in seconds, not minutes."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def repo_root() -> Path:
    """The project root, also from inside a queued DVC experiment's temporary copy (.dvc/tmp/exps/...)."""
    here = str(Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve())
    return Path(here.split(_EXPS_MARK)[0]) if _EXPS_MARK in here else Path(here)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def local_dir() -> Path:
    """<repo root>/.kdprune: what this clone keeps for itself (records of runs to close), git-ignored."""
    return repo_root() / ".kdprune"


def is_sqlite(uri: str) -> bool:
    return bool(_SQLITE.match(uri))


_DATABASES = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # the database servers MLflow stores runs in


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer, or nothing listens at a
    database server's host and port (MLflow retries opening a database for minutes: a stage against a
    PostgreSQL that was down waited 10 minutes for its error)."""
    scheme = uri.partition("://")[0].partition("+")[0]
    if scheme in _DATABASES:
        _check_listening(uri, _DATABASES[scheme], timeout)
        return
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request  # (here: every stage's own process reads this module before it hands over)

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        reason = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise TrackingError(f"MLflow tracking server {uri} is not answering ({reason})") from e


def _check_listening(uri: str, default_port: int, timeout: float) -> None:
    import socket

    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's ArgumentError, or a ValueError for a bad port
        raise TrackingError(f"MLflow tracking store {uri}: {_first_line(e)}") from e
    if not url.host:  # a Unix socket (?host=/var/run/postgresql), or the driver's own default
        return
    shown = url.render_as_string(hide_password=True)
    try:
        socket.create_connection((url.host, url.port or default_port), timeout=timeout).close()
    except OSError as e:
        raise TrackingError(f"MLflow tracking store {shown} is not answering ({e.strerror or e})") from e


def check_exists(uri: str) -> None:
    """For a command that reads a store and never makes one (kdprune report, doctor): a sqlite file that
    is not there is a mistyped path, which MLflow would quietly make into an empty store. The file as
    SQLAlchemy reads the URI (percent-escapes decoded); SQLite's own `file:` URIs are left to it."""
    if not is_sqlite(uri):
        return
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    if url.database in (None, "", ":memory:") or url.query.get("uri"):
        return
    db = Path(url.database).absolute()
    if not db.is_file():
        raise TrackingError(f"{uri}: no store at {db} (a stage that tracks makes it)")


def find_experiment(name: str) -> tuple[Any, Any]:
    """For a command that reads a store and makes nothing in it (kdprune report, doctor): a client of the
    configured store, found answering and there, and its experiment `name`, or None where it has none."""
    from mlflow import MlflowClient

    configure()
    uri = tracking_uri()
    check_reachable(uri)
    check_exists(uri)
    with named_errors(uri):
        client = MlflowClient(uri)
        return client, client.get_experiment_by_name(name)


def _sqlite_dir(uri: str) -> Path:
    """The directory of a sqlite store's database file: its lock and, by default, its artifacts go there."""
    db = _sqlite_file(uri)
    return db.parent if db is not None else repo_root()


def _sqlite_file(uri: str) -> Path | None:
    """A sqlite store's database file (None in memory)."""
    path = _SQLITE.sub("", uri, count=1).split("?", 1)[0]
    if path.startswith("/"):  # sqlite:///<path>: the third slash separates, an absolute path keeps its own
        path = path[1:]
    return Path(path).resolve() if path not in ("", ":memory:") else None


def _from_template(uri: str) -> None:
    """A sqlite store about to be created starts as a copy of an empty one, made once per MLflow version
    on this machine: MLflow's schema migrations take two seconds for every new store (every clone, every
    experiment's copy, every test), a copy milliseconds. The template holds MLflow's tables and no
    experiment: MLflow adds its Default experiment, with this store's artifact root, when it opens the
    copy. Under the store's lock; any failure leaves the store for MLflow to create as usual."""
    db = _sqlite_file(uri)
    if db is None or db.exists():
        return
    with contextlib.suppress(Exception):
        write_atomic(db, _empty_store().read_bytes())


def _empty_store() -> Path:
    """The template of _from_template, made under a lock of its own beside the tracking service's sockets."""
    import sqlite3
    import tempfile

    import mlflow
    from filelock import FileLock
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from kdprune.tracker import service_dir

    template = service_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    with FileLock(str(template.with_suffix(".lock"))):
        if not template.exists():
            with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
                made = Path(tmp) / "empty.db"
                SqlAlchemyStore(f"sqlite:///{made}", str(Path(tmp) / "artifacts")).engine.dispose()
                with contextlib.closing(sqlite3.connect(made)) as db:
                    db.execute("DELETE FROM experiments")  # the Default experiment, with this folder's artifact root
                    db.commit()
                os.replace(made, template)
    return template


def _store_lock(uri: str) -> Any:
    """The lock that serialises opening a sqlite store: .mlflow.lock beside the database, so processes
    started from different working directories (or DVC experiment copies) share it."""
    from filelock import FileLock

    if not is_sqlite(uri):
        return contextlib.nullcontext()
    return FileLock(str(_sqlite_dir(uri) / ".mlflow.lock"))


def ensure_experiment() -> str:
    """Connect, creating the store and the experiment once, under a lock, and return its id.

    Several processes opening a brand-new sqlite store at once corrupt it, and two creating the
    same experiment race: one lock file beside the database serialises both. The experiment is
    tagged as model training, so MLflow's UI opens it on runs, not on GenAI traces.
    """
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    if is_sqlite(uri):
        # Seconds of imports and ORM set-up: done before the lock, so only the database work is serialised.
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    with named_errors(uri), _store_lock(uri):
        if is_sqlite(uri):
            _from_template(uri)
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get("mlflow.experimentKind") != "custom_model_development":
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, "mlflow.experimentKind",
                                                         "custom_model_development")
            return exp.experiment_id
        location = (_sqlite_dir(uri) / "mlartifacts").as_uri() if is_sqlite(uri) else None
        try:
            return mlflow.create_experiment(name, artifact_location=location,
                                            tags={"mlflow.experimentKind": "custom_model_development"})
        except mlflow.exceptions.MlflowException:  # another process won the race on a server
            return mlflow.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def named_errors(uri: str) -> Iterator[None]:
    """Any error of the store's (a scheme MLflow does not know, a driver not installed, an artifact store
    that refuses a file) as one TrackingError line naming it; a TrackingError as it is."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {uri}: {_first_line(e)}") from e


_DOWN: set[str] = set()  # stores that used up their retries: later calls try once, until one succeeds


def call(fn: Callable[..., T], *args: Any, what: str = "call", **kwargs: Any) -> T:
    """One tracking call, retried after 1, 2 and 4 s when the store cannot be reached; after that a
    TrackingError naming the URI (the server is down, not just restarting), and single attempts for
    the calls queued behind it, so a dead server fails a stage once, not once per message."""
    uri = tracking_uri()
    for delay in ((None,) if uri in _DOWN else (*RETRY_DELAYS, None)):
        try:
            result = fn(*args, **kwargs)
            _DOWN.discard(uri)
            return result
        except Exception as e:  # noqa: BLE001 - mlflow wraps connection failures in several types
            if not _unreachable(e):
                if isinstance(e, OSError):  # a full or read-only disk under the artifact store
                    raise TrackingError(f"MLflow {what} at {tracking_uri()}: {_first_line(e)}") from e
                raise
            if delay is None:
                _DOWN.add(uri)
                raise TrackingError(f"MLflow tracking server {uri} stopped answering during {what} "
                                    f"({_first_line(e)})") from e
            time.sleep(delay)
    raise AssertionError("unreachable")


def _unreachable(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in ("ConnectionError", "Connection refused", "Max retries exceeded",
                                   "ConnectTimeout", "ReadTimeout", "RemoteDisconnected", "database is locked"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
