"""Experiments compute an identical stage once: whether they run side by side or one after another.

DVC's run-cache does not cover two cases a sweep meets at once:
- two workers (`dvc queue start -j 2`) start two experiments of the same seed together; both reach
  `train_teacher` before either has finished it, and a run-cache entry exists only once one has;
- on a clone without the DVC cache (a fresh clone, no remote), an experiment whose stage matches
  the committed dvc.lock looks for that lock entry's outputs in the cache, not in the run-cache, so
  every experiment of the committed seed retrains its teacher, one after another.

So inside `dvc exp run`, a stage wrapped by `once` first takes a lock named by the hash of what
dvc.yaml says it reads: its command, the bytes of its deps, the values of its params. The holder
computes, then leaves its outputs beside the lock (output directories as hard links). A stage
that finds such outputs, made less than KEEP seconds ago (by a sibling it waited for, or earlier),
restores them instead of computing. Like a run-cache hit, it logs no MLflow run: the outputs carry
the record of the run that made them. Outside `dvc exp run` (`dvc repro`, `dvc repro -f`, tests, a
script run by hand), and with KDPRUNE_SHARE=0, a stage always computes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from kdprune.files import sha256, staged_dir, write_atomic, write_json

KEEP = 24 * 3600.0  # seconds: outputs left this long ago are deleted, not reused
_VAR = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def store_dir() -> Path:
    """Where the locks and copies live: the project's own .dvc/tmp, shared by every experiment copy."""
    from kdprune.tracking import repo_root

    return repo_root() / ".dvc" / "tmp" / "kdprune-shared"


def once(main: Callable[[], Any]) -> Callable[[], None]:
    """`main`, computed once per distinct inputs among experiments side by side or within KEEP seconds."""

    @functools.wraps(main)
    def run() -> None:
        address, exp = os.environ.get("DVC_STAGE"), os.environ.get("DVC_EXP_NAME")
        enabled = os.environ.get("KDPRUNE_SHARE", "1") != "0"
        spec = stage_spec(address) if address and exp and enabled else None
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
    if not isinstance(stage, dict) or set(stage) & {"foreach", "matrix", "do", "wdir"}:
        return None
    if dvcfile.parent != Path("."):  # paths in a nested dvc.yaml are relative to its own folder
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
             keep: float = KEEP) -> bool:
    """Under the lock for `key`: restore the `outputs` another experiment left less than `keep` seconds
    ago, or compute them and leave them for the next. True when this process computed."""
    from filelock import FileLock, Timeout

    store.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(store / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"{name}: the same {name} is running in another experiment; waiting for it", flush=True)
        lock.acquire()
    try:
        entry = _fresh(store / key, since=time.time() - keep)
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
        _collect(store, spare=key, keep=keep)


def _fresh(entry: Path, since: float) -> dict[str, Any] | None:
    try:
        info = json.loads((entry / "entry.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("finished_at", 0) >= since else None


def _save(store: Path, key: str, name: str, outputs: list[str]) -> None:
    with staged_dir(store / key) as tmp:
        for rel in outputs:
            src, dst = Path(rel), tmp / "files" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            # Output directories (data, models, scores) are DVC-cached and only ever replaced whole: their
            # files are hard-linked, costing no space. Single files (metrics, plots) are small: copied.
            shutil.copytree(src, dst, copy_function=_link) if src.is_dir() else shutil.copy2(src, dst)
        write_json(tmp / "entry.json", {"stage": name, "experiment": os.environ.get("DVC_EXP_NAME"),
                                        "finished_at": time.time()})


def _link(src: Path | str, dst: Path | str) -> None:
    """A hard link, or a copy where the filesystem allows none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _restore(entry: Path, outputs: list[str]) -> None:
    for rel in outputs:
        src = entry / "files" / rel
        if src.is_dir():
            with staged_dir(rel) as out:
                shutil.copytree(src, out, dirs_exist_ok=True, copy_function=shutil.copyfile)  # fresh modes
        else:
            write_atomic(rel, src.read_bytes())


def _collect(store: Path, spare: str, keep: float) -> None:
    """Delete outputs left more than `keep` seconds ago, each under its own lock, skipping any in use."""
    from filelock import FileLock, Timeout

    for entry in store.iterdir():
        if entry.name == spare or entry.name.startswith(".") or not entry.is_dir():
            continue
        if _fresh(entry, since=time.time() - keep) is not None:
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
