"""Plain files on disk: atomic writes, JSON, hashes, and directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from kdprune.errors import CheckpointError

# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the modes a plain open() would give.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
# A temporary sibling is `.<name>.<pid>.<random>.tmp` (or `.old`), with at most this much of the name: a
# name may have 255 bytes, and the pid, the random part and the suffix then still fit
_STEM = 200


def _sibling(path: Path) -> str:
    return f".{path.name[:_STEM]}.{os.getpid()}."


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary name beside `path`, fsync, then rename into place. An error names `path`,
    never the temporary name a user has never seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_sibling(path), suffix=".tmp")
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename == tmp:
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise


def dumps_json(obj: Any) -> str:
    """The one JSON layout of every file we write: sorted keys, two-space indent, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, dumps_json(obj))


def read_json(path: str | Path) -> Any:
    try:
        with Path(path).open() as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({str(e).splitlines()[0]})") from e


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with Path(path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    return h.hexdigest()


# What `staged` has put in place in this process: a stage interrupted after it knows its outputs are new.
replaced: list[Path] = []


@contextlib.contextmanager
def staged(outputs: Mapping[str | Path, str]) -> Iterator[dict[Path, Path]]:
    """Yield a twin of each output ({path: "file" or "folder"}) to write instead: an empty folder, or for a
    file a path of the same name in a folder of its own (what is logged from it keeps its name). When the
    block ends without error the twins replace the outputs, SIGINT and SIGTERM held until the last is in
    place; an error in the block, or between two replacements, leaves every output as it was.

    A stage that dies half-way leaves its outputs as they were: never a mix of old and new files, nor a new
    curve beside the old model. Siblings left by a stage that was killed (SIGKILL gives no chance to clean
    up) are removed first: their names carry the pid of the process that made them.
    """
    kinds = {Path(path): kind for path, kind in outputs.items()}
    folders: dict[Path, Path] = {}
    try:
        for out in kinds:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                remove_stale(out)
                folders[out] = Path(tempfile.mkdtemp(dir=out.parent, prefix=_sibling(out), suffix=".tmp"))
            except OSError as e:  # a read-only folder, a file where a folder should be: the output, not a temp name
                raise OSError(e.errno, f"cannot write here ({e.strerror})", str(out)) from e
            folders[out].chmod(0o777 & ~_UMASK)
        twins = {out: folders[out] if kind == "folder" else folders[out] / out.name for out, kind in kinds.items()}
        yield twins
        with _signals_held():
            _replace_all(twins)
            replaced.extend(twins)
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """`staged` for one folder: yield an empty sibling; on success it replaces `out` whole."""
    with staged({out: "folder"}) as twins:
        yield twins[Path(out)]


def _replace_all(twins: dict[Path, Path]) -> None:
    """Each output set aside, its twin renamed into its place; an error (or a signal not held) on the way
    puts every output set aside back."""
    moved: list[tuple[Path, Path | None]] = []  # (output, its old self set aside, None where there was none)
    try:
        for out, twin in twins.items():
            old = None
            if os.path.lexists(out):
                old = out.with_name(f"{_sibling(out)}old")
                os.replace(out, old)
            moved.append((out, old))
            os.replace(twin, out)
    except BaseException:
        for out, old in reversed(moved):
            if old is None or os.path.lexists(old):
                _remove(out)
                if old is not None:
                    os.replace(old, out)
        raise
    for _, old in moved:
        if old is not None:
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM noted, not acted on, inside the block; on leaving it the handlers are put back and
    what came is raised then. Python runs every handler in the main thread, whichever thread the signal
    reached, so handlers swapped there hold them (a signal mask would not: under dvc a watchdog thread
    takes them). Elsewhere nothing can be held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    kept = {signum: signal.signal(signum, lambda signum, frame: came.append(signum))
            for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(came):
            signal.raise_signal(signum)


def check_writable(path: str | Path, kind: str) -> None:
    """That write_atomic (`kind` "file") or staged_dir ("folder") could put `path` in place, checked before a
    stage's work: no file where a folder must be made above it, a folder there that may be written in, and
    nothing of the other kind at `path` itself. An OSError naming `path` otherwise."""
    path = Path(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind: expected file or folder, got {kind!r}")
    if path.exists() and path.is_dir() != (kind == "folder"):
        found = "folder" if path.is_dir() else "file"
        raise OSError(errno.EISDIR if found == "folder" else errno.ENOTDIR,
                      f"cannot write here (a {found} is where this stage writes a {kind})", str(path))
    above = path.absolute().parent
    while not above.exists() and not above.is_symlink():
        above = above.parent
    if not above.is_dir():
        raise OSError(errno.ENOTDIR, f"cannot write here ({above} is not a folder)", str(path))
    if not os.access(above, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"cannot write here ({above}: Permission denied)", str(path))


def remove_stale(out: Path) -> None:
    """Delete `.<name>.<pid>.*` siblings of `out` whose process is gone."""
    stem = out.name[:_STEM]
    for entry in out.parent.glob(f".{glob.escape(stem)}.*"):
        parts = entry.name[len(stem) + 2:].split(".")
        if len(parts) >= 2 and parts[0].isdigit() and entry.suffix in (".tmp", ".old") and not _alive(int(parts[0])):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
