"""Two experiments of a queue starting the same new stage at the same moment compute it once.

DVC's run-cache serves a stage that another experiment has *finished*; it cannot serve one that a
sibling worker is computing right now (`dvc queue start -j 2` on a grid with two points per seed
starts both teachers of a seed together). So inside `dvc exp run`, a stage first takes a lock named
by the hash of what it reads (its code, the params it reads, the fingerprints of its inputs). The
holder computes and leaves hard links to its outputs beside the lock; a sibling that waited on the
lock restores them instead of computing (and, like a run-cache hit, logs no MLflow run: its
outputs are the same bytes, so lineage finds the run that made them). Entries are deleted after
KEEP seconds: by then DVC's own run-cache serves any later experiment. Outside `dvc exp run`, and
with KDPRUNE_SHARE=0, nothing is shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from kdprune import manifest
from kdprune.files import staged, staged_dir, write_atomic, write_json
from kdprune.params import Params, section
from kdprune.switches import switch

KEEP = 1800.0  # seconds an entry waits for a sibling that was blocked on its lock


def store_dir() -> Path:
    """The project's own .dvc/tmp, the same from every experiment's temporary copy."""
    from kdprune.store import repo_root

    return repo_root() / ".dvc" / "tmp" / "kdprune-shared"


@contextlib.contextmanager
def once(stage: str, p: Params, reads: tuple[str, ...], inputs: dict[str, Path], outputs: list[Path]) -> Iterator[None]:
    """Around a stage's work: restore a sibling's outputs (raising stage.Reused), or compute and leave them."""
    if not os.environ.get("DVC_EXP_NAME") or switch("KDPRUNE_SHARE") == "0":
        yield
        return
    from filelock import FileLock

    from kdprune.stage import Reused

    root = store_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = stage_key(stage, p, reads, inputs)
    with FileLock(str(root / f"{key}.lock")):
        entry = root / key
        if (entry / "entry.json").exists():
            _restore(entry, outputs)
            raise Reused(f"{stage}: restored the outputs of the identical {stage} a sibling experiment "
                         f"computed (same code, params and inputs); nothing recomputed")
        yield
        _leave(entry, stage, outputs)
    _collect(root)


def _leave(entry: Path, stage: str, outputs: list[Path]) -> None:
    """The outputs, linked into `entry` for siblings. After the stage's run is closed FINISHED and its outputs
    are in place, so a failure here is a warning: the siblings compute it themselves."""
    try:
        _link_outputs(entry, stage, outputs)
    except OSError as e:
        print(f"warning: {stage}'s outputs were not left for sibling experiments ({e})", file=sys.stderr)


def stage_key(stage: str, p: Params, reads: tuple[str, ...], inputs: dict[str, Path]) -> str:
    """The hash of everything that decides the stage's outputs: all of kdprune's code (over-inclusive,
    so never wrong), the params it reads and the fingerprints of its inputs."""
    package = Path(__file__).parent
    script = Path(__file__).resolve().parents[2] / "stages" / f"{stage}.py"
    code = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(package.glob("*.py"))}
    if script.exists():
        code[script.name] = hashlib.sha256(script.read_bytes()).hexdigest()
    blob = {"stage": stage, "code": code, "params": section(p, *reads),
            "inputs": {role: manifest.fingerprint(path) for role, path in inputs.items()}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _link_outputs(entry: Path, stage: str, outputs: list[Path]) -> None:
    if not all(Path(o).exists() for o in outputs):
        return
    with staged_dir(entry) as tmp:
        for i, src in enumerate(map(Path, outputs)):
            dst = tmp / str(i)
            # directories (data, models, scores) are replaced whole, never edited: hard links cost nothing
            shutil.copytree(src, dst, copy_function=_link) if src.is_dir() else shutil.copy2(src, dst)
        write_json(tmp / "entry.json", {"stage": stage, "made": time.time()})


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _restore(entry: Path, outputs: list[Path]) -> None:
    """A sibling's outputs into place, all of them or (on an error) none."""
    sources = {Path(out): entry / str(i) for i, out in enumerate(outputs)}
    with staged({out: "folder" if src.is_dir() else "file" for out, src in sources.items()}) as new:
        for out, src in sources.items():
            if src.is_dir():
                shutil.copytree(src, new[out], dirs_exist_ok=True, copy_function=shutil.copyfile)
            else:
                write_atomic(new[out], src.read_bytes())


def _collect(root: Path) -> None:
    """Delete entries older than KEEP, each under its own lock, skipping any in use. Siblings collect at
    once: an entry another deleted, or one that cannot be read, is skipped (they had failed a stage whose
    run was closed FINISHED, its outputs in place)."""
    from filelock import FileLock, Timeout

    for entry in root.iterdir():
        try:
            made = json.loads((entry / "entry.json").read_text())["made"]
        except (OSError, ValueError, KeyError, TypeError):  # gone, being written, a lock file, or damaged
            continue
        if entry.name.startswith(".") or time.time() - made < KEEP:
            continue
        with contextlib.suppress(Timeout), FileLock(str(root / f"{entry.name}.lock"), timeout=0):
            shutil.rmtree(entry, ignore_errors=True)
