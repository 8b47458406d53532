"""Experiments running side by side compute an identical stage once.

DVC's run-cache lets an experiment skip a stage that an earlier one ran with the same inputs, but
only once that stage has finished. Queued experiments run by several workers (`dvc queue start -j 2`)
reach the same stage together (`train_teacher` for the same seed, say) and would both compute it.

Inside `dvc exp run`, a stage wrapped by `once` first takes a lock named by the hash of what dvc.yaml
says the stage reads: its command, the bytes of its deps and the values of its params. The holder
computes, then leaves a copy of its outputs beside the lock. A stage that waited on that lock, or that
arrives within GRACE seconds of the copy (before DVC has written its run-cache entry), restores the
copy instead of recomputing. Like a run-cache hit, it logs no MLflow run: the outputs carry the
record of the run that made them. Outside `dvc exp run` (`dvc repro`, tests, a script run by hand)
a stage always computes, so `dvc repro -f` still means what it says.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from kdprune.files import sha256, staged_dir, write_atomic, write_json

GRACE = 30.0  # seconds: a copy this fresh was made by a sibling whose run-cache entry may not exist yet
KEEP = 3600.0  # seconds: older copies are deleted; nothing can still be waiting for them
_VAR = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def store_dir() -> Path:
    """Where the locks and copies live: the project's own .dvc/tmp, shared by every experiment copy."""
    from kdprune.tracking import repo_root

    return repo_root() / ".dvc" / "tmp" / "kdprune-shared"


def once(main: Callable[[], Any]) -> Callable[[], None]:
    """`main`, run at most once per distinct inputs among the experiments running at the same time."""

    @functools.wraps(main)
    def run() -> None:
        address, exp = os.environ.get("DVC_STAGE"), os.environ.get("DVC_EXP_NAME")
        spec = stage_spec(address) if address and exp else None
        try:
            key = stage_key(spec) if spec else None
        except (OSError, yaml.YAMLError):  # DVC itself reports a missing or broken params file
            key = None
        if key is None:
            main()
            return
        run_once(spec["name"], key, spec["outputs"], main, store_dir())

    return run


def stage_spec(address: str) -> dict[str, Any] | None:
    """The command, deps, params and outputs dvc.yaml declares for the stage DVC is running, with vars
    resolved; None for a stage this module does not model (foreach/matrix, wdir, unknown vars)."""
    path, _, name = address.rpartition(":")
    dvcfile = Path(path or "dvc.yaml")
    try:
        doc = yaml.safe_load(dvcfile.read_text())
    except (OSError, yaml.YAMLError):
        return None
    stage = (doc.get("stages") or {}).get(name)
    if not isinstance(stage, dict) or set(stage) & {"foreach", "matrix", "do", "wdir"} or dvcfile.parent != Path("."):
        return None
    variables: dict[str, Any] = {}
    for item in doc.get("vars") or []:
        if not isinstance(item, dict):
            return None  # a params file of vars: not modelled
        variables.update(item)
    try:
        stage = _resolve(stage, variables)
    except KeyError:
        return None

    def paths(entries: list[Any]) -> list[str]:
        return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]

    outputs = [p for kind in ("outs", "metrics", "plots") for p in paths(stage.get(kind))]
    return {"name": name, "cmd": stage.get("cmd"), "deps": paths(stage.get("deps")),
            "params": stage.get("params") or [], "outputs": outputs}


def _resolve(obj: Any, variables: dict[str, Any]) -> Any:
    if isinstance(obj, str):
        return _VAR.sub(lambda m: str(variables[m.group(1)]), obj)
    if isinstance(obj, list):
        return [_resolve(v, variables) for v in obj]
    if isinstance(obj, dict):
        return {_resolve(k, variables): _resolve(v, variables) for k, v in obj.items()}
    return obj


def stage_key(spec: dict[str, Any]) -> str:
    """The hash of everything the stage reads, as dvc.yaml declares it."""
    files: dict[str, Any] = {}

    def params_file(name: str) -> Any:
        if name not in files:
            files[name] = yaml.safe_load(Path(name).read_text()) or {}
        return files[name]

    params: dict[str, Any] = {}
    for entry in spec["params"]:
        if isinstance(entry, str):
            params[entry] = _lookup(params_file("params.yaml"), entry)
        else:
            (name, keys), = entry.items()
            doc = params_file(name)
            params[name] = doc if not keys else {k: _lookup(doc, k) for k in keys}
    blob = {"stage": spec["name"], "cmd": spec["cmd"], "params": params,
            "deps": {d: _digest(Path(d)) for d in spec["deps"]}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _lookup(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def _digest(path: Path) -> Any:
    if path.is_file():
        return sha256(path)
    if path.is_dir():
        return {str(f.relative_to(path)): sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return None


def run_once(name: str, key: str, outputs: list[str], compute: Callable[[], Any], store: Path,
             grace: float = GRACE) -> bool:
    """Compute under the lock for `key`, leaving a copy of `outputs`; or restore the copy a sibling left
    while we waited (or at most `grace` seconds before we came). True when this process computed."""
    from filelock import FileLock, Timeout

    store.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(store / f"{key}.lock"))
    since = time.time() - grace
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"{name}: the same {name} is running in another experiment; waiting for it", flush=True)
        lock.acquire()
    try:
        entry = _fresh(store / key, since)
        if entry is not None:
            _restore(store / key, outputs)
            print(f"{name}: reused the outputs of the identical {name} that experiment "
                  f"{entry.get('experiment')} finished {time.time() - entry['finished_at']:.0f} s ago "
                  "(same command, deps and params); nothing recomputed", flush=True)
            return False
        compute()
        try:
            if all(Path(p).exists() for p in outputs):
                _save(store, key, name, outputs)
        except OSError as e:  # the stage's own outputs are complete: a copy we cannot leave only costs reuse
            print(f"{name}: warning: could not leave a copy for other experiments in {store}: {e}", flush=True)
        return True
    finally:
        lock.release()
        _collect(store, keep=key)


def _fresh(entry: Path, since: float) -> dict[str, Any] | None:
    try:
        info = json.loads((entry / "entry.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("finished_at", 0) >= since else None


def _save(store: Path, key: str, name: str, outputs: list[str]) -> None:
    tmp = Path(tempfile.mkdtemp(dir=store, prefix=f".{key}.", suffix=".tmp"))
    try:
        for rel in outputs:
            src, dst = Path(rel), tmp / "files" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
        write_json(tmp / "entry.json", {"stage": name, "experiment": os.environ.get("DVC_EXP_NAME"),
                                        "finished_at": time.time()})
        old = store / f".{key}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (store / key).exists():
            os.replace(store / key, old)
        os.replace(tmp, store / key)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore(entry: Path, outputs: list[str]) -> None:
    for rel in outputs:
        src = entry / "files" / rel
        if src.is_dir():
            with staged_dir(rel) as out:
                shutil.copytree(src, out, dirs_exist_ok=True)
        else:
            write_atomic(rel, src.read_bytes())


def _collect(store: Path, keep: str) -> None:
    """Delete copies older than KEEP, each under its own lock, skipping any that is in use."""
    from filelock import FileLock, Timeout

    for entry in store.iterdir():
        if entry.name == keep or entry.name.startswith(".") or not entry.is_dir():
            continue
        info = _fresh(entry, since=0) or {}
        if time.time() - info.get("finished_at", 0) < KEEP:
            continue
        lock = FileLock(str(store / f"{entry.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            lock.release()
