"""dvc.yaml declares what decides each stage's outputs: its script, the computing modules it imports, its params."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import REPO

PKG = REPO / "src/kdprune"
# Modules that track, lock, print, write files or run processes: they never decide an output's bytes,
# so a stage does not depend on them (editing a log message must not retrain a teacher).
INFRA = {"errors", "files", "forkserver", "procs", "progress", "registry", "runs", "sharing", "stage", "store",
         "summary", "switches", "tracker", "zygote"}
TOOLS = {"cli", "sweep"}  # the `kdprune` command: no stage imports them


def _imports(path: Path) -> set[str]:
    """kdprune modules imported anywhere in a file, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdprune"):
            names = [node.module] if node.module != "kdprune" else [f"kdprune.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kdprune."))
    return {n.split(".")[1] for n in found if n.count(".") >= 1}


def _closure(script: Path) -> set[str]:
    """Every kdprune module the script reaches through imports, the infrastructure ones included."""
    seen, todo = set(), list(_imports(script))
    while todo:
        mod = todo.pop()
        if mod not in seen and (PKG / f"{mod}.py").exists():
            seen.add(mod)
            todo += list(_imports(PKG / f"{mod}.py"))
    return seen


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _declared_params(stage: dict) -> set[str]:
    return {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}


def test_every_stage_depends_on_its_script_and_exactly_the_computing_modules_it_reaches():
    for name, stage in _stages().items():
        deps = set(stage["deps"])
        assert stage["cmd"].startswith(f"python stages/{name}.py"), name
        assert f"stages/{name}.py" in deps, name
        needed = {f"src/kdprune/{m}.py" for m in _closure(REPO / "stages" / f"{name}.py") - INFRA}
        declared = {d for d in deps if d.startswith("src/kdprune/")}
        assert needed == declared, (name, sorted(needed - declared), sorted(declared - needed))


def test_dvc_yaml_spells_its_paths_out():
    """No `vars` and no `${...}`: DVC parses every interpolation with pyparsing on every command, which
    took 0.1 s of a no-op `dvc repro` (1.38 s against 1.49 s, medians of 6) for a shorter path."""
    def strings(node):
        if isinstance(node, dict):
            yield from (s for k, v in node.items() for s in (k, *strings(v)))
        elif isinstance(node, list):
            yield from (s for v in node for s in strings(v))
        elif isinstance(node, str):
            yield node

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "vars" not in spec and [s for s in strings(spec) if "${" in s] == []


def test_no_stage_depends_on_tracking_locking_or_printing():
    for name, stage in _stages().items():
        deps = {Path(d).stem for d in stage["deps"] if d.startswith("src/kdprune/")}
        assert not deps & INFRA, (name, deps & INFRA)


def test_infrastructure_modules_exist_and_every_module_is_classified():
    modules = {f.stem for f in PKG.glob("*.py")} - {"__init__"}
    assert INFRA | TOOLS <= modules
    used = set().union(*(_closure(REPO / "stages" / f"{s}.py") for s in _stages()))
    assert not used & TOOLS
    assert (modules - INFRA - TOOLS) - used == set(), sorted((modules - INFRA - TOOLS) - used)


def test_infrastructure_reaches_no_computing_module_but_the_manifest_and_the_params():
    """So the closure above may pass through infrastructure: what stage.run hands a stage (the params
    object, torch set up deterministically, the manifest that seals its outputs) is all it adds."""
    for module in INFRA:
        reached = _imports(PKG / f"{module}.py") - INFRA
        assert reached <= {"manifest", "params", "determinism"}, (module, reached)


def test_every_stage_but_validate_depends_on_the_validation_marker():
    for name, stage in _stages().items():
        if name != "validate":
            assert "artifacts/params.ok" in stage["deps"], name


def test_every_params_key_a_stage_reads_is_declared():
    """The READS a stage logs and hashes, and every `p.<section>.<key>` read in its script or in a
    computing module it reaches (rounds.py reads p.prune.*, p.score.*), are under its `params:`."""
    for name, stage in _stages().items():
        declared = _declared_params(stage)
        if name == "validate" or "params.yaml" in declared:
            continue
        text = (REPO / "stages" / f"{name}.py").read_text()
        reads = re.search(r"READS = \(([^)]*)\)", text)
        assert reads, name
        assert set(re.findall(r'"([\w.]+)"', reads.group(1))) == declared, name
        modules = [REPO / "stages" / f"{name}.py"] + [PKG / f"{m}.py" for m in _closure(REPO / "stages" / f"{name}.py")
                                                     - INFRA]
        for path in modules:
            if path.parent == PKG and not re.search(r"^from kdprune.params import .*\bParams\b", path.read_text(), re.M):
                continue  # a module that never takes the params object: its `p` is something else
            for section, key in re.findall(r"\bp\.(\w+)(?:\.(\w+))?", path.read_text()):
                read = f"{section}.{key}" if key else section
                assert section in declared or read in declared, (name, path.name, read)


def test_tracking_settings_are_never_params():
    text = (REPO / "params.yaml").read_text()
    assert "tracking" not in text and "mlflow" not in text.lower()


def test_no_cached_output_is_also_tracked_by_git():
    """A file both in git and among a stage's cached outputs stops a fresh clone's `dvc repro` at that stage
    ("output ... is already tracked by SCM"): every cached output is git-ignored instead, and only the
    uncached ones (validate's marker, evaluate's measured files) are committed."""
    import subprocess

    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    cached, uncached = set(), set()
    for stage in _stages().values():
        for out in (*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            (uncached if (opts or {}).get("cache") is False else cached).add(path)
    both = sorted(p for p in cached if p in tracked or any(t.startswith(p + "/") for t in tracked))
    assert both == []
    assert uncached <= tracked


def test_git_ignores_the_raw_datasets_but_keeps_their_dvc_files():
    """data/raw is prepare's dependency: the datasets there stay out of git, and `dvc add data/raw/MNIST`
    writes a MNIST.dvc that git can take (DVC then writes no .gitignore of its own there)."""
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO).returncode == 0

    assert ignored("data/raw/MNIST/raw/train-images-idx3-ubyte") and ignored("data/raw/cifar-10-batches-py")
    assert not ignored("data/raw/README.md") and not ignored("data/raw/MNIST.dvc")
    assert "data/raw" in _stages()["prepare"]["deps"]
