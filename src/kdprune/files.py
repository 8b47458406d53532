"""Plain files on disk: atomic writes, JSON, hashes, and directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

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


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty sibling directory; on success it replaces `out` whole, on failure it is removed.

    A stage that dies half-way leaves `out` as it was: never a mix of old and new files. Siblings
    left by a stage that was killed (SIGKILL gives no chance to clean up) are removed first: their
    names carry the pid of the process that made them.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_sibling(out), suffix=".tmp"))
    except OSError as e:  # a read-only folder, a file where a folder should be: name the output, not a temp name
        raise OSError(e.errno, f"cannot write here ({e.strerror})", str(out)) from e
    try:
        tmp.chmod(0o777 & ~_UMASK)
        yield tmp
        old = out.with_name(f"{_sibling(out)}old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
