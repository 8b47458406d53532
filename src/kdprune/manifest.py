"""What a stage's output directory holds and what it was made from: manifest.json, checked by its readers.

Every output directory ends with manifest.json: the SHA-256 of each of its files and the
fingerprints of the directories it was made from. Its bytes depend only on those contents, so its
own SHA-256 is the directory's *fingerprint*: a content address that is the same on every machine,
by which the MLflow run that made the directory is found (no run id is ever written into an output).
A stage reading a directory checks every file against the manifest first: a swapped split, logits
of the right shape from elsewhere or a hand-edited model stop it, naming the file and the manifest.
"""

from __future__ import annotations

from pathlib import Path

from kdprune.errors import CheckpointError
from kdprune.files import dumps_json, read_json, sha256, write_atomic

MANIFEST = "manifest.json"


def write(out_dir: Path, stage: str, inputs: dict[str, str]) -> str:
    """manifest.json for every file now in `out_dir`; `inputs` maps a role to a fingerprint. Returns
    the directory's fingerprint."""
    files = {str(f.relative_to(out_dir)): sha256(f) for f in sorted(out_dir.rglob("*"))
             if f.is_file() and f.name != MANIFEST}
    text = dumps_json({"stage": stage, "files": files, "inputs": inputs})
    write_atomic(out_dir / MANIFEST, text)
    return sha256(out_dir / MANIFEST)


def verify(in_dir: str | Path) -> str:
    """Check every file of `in_dir` against its manifest.json, and that it holds no other; return the
    directory's fingerprint."""
    in_dir = Path(in_dir)
    path = in_dir / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{path}: missing: {in_dir} was not written by a kdprune stage "
                              f"(or is incomplete); re-run the stage that makes it")
    record = read_json(path)
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: not a kdprune manifest (no 'files' mapping)")
    for name, digest in files.items():
        if sha256(in_dir / name) != digest:
            raise CheckpointError(f"{in_dir / name}: its SHA-256 differs from the one {path} recorded: the file "
                                  f"was replaced or edited; restore it (dvc checkout) or re-run its stage")
    for f in sorted(in_dir.rglob("*")):  # a reader may look for a file (finetune: masks.pt) its stage never wrote
        if f.is_file() and f.name != MANIFEST and str(f.relative_to(in_dir)) not in files:
            raise CheckpointError(f"{f}: not listed in {path}: the file was added to what its stage wrote; "
                                  f"remove it (dvc checkout) or re-run its stage")
    return sha256(path)


def fingerprint(path: str | Path) -> str:
    """A directory written by a stage: checked, and its manifest's hash; a single file (a user's own
    weights): its SHA-256."""
    path = Path(path)
    return verify(path) if path.is_dir() else sha256(path)


def inputs_of(in_dir: str | Path) -> dict[str, str]:
    """The fingerprints of what `in_dir` was made from, as its manifest records them."""
    path = Path(in_dir) / MANIFEST
    record = read_json(path)
    inputs = record.get("inputs") if isinstance(record, dict) else None
    if not isinstance(inputs, dict):
        raise CheckpointError(f"{path}: not a kdprune manifest (no 'inputs' mapping)")
    return dict(inputs)


def check_made_from(in_dir: str | Path, role: str, source: str | Path, fingerprint: str) -> None:
    """Refuse `in_dir` unless its manifest says it was made from `source` (whose fingerprint is given)."""
    made = inputs_of(in_dir).get(role)
    if made != fingerprint:
        raise CheckpointError(f"{Path(in_dir) / MANIFEST}: made from another {role} than {source} "
                              f"({(made or 'none')[:12]} vs {fingerprint[:12]}): re-run the stage that makes "
                              f"{in_dir}, or pass the {role} it was made from")
