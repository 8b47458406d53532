"""dvc.yaml declares what each stage really reads: its script, every package module it imports, its params."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from tests.conftest import REPO

PKG = REPO / "src/kdprune"


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
    seen, todo = set(), list(_imports(script))
    while todo:
        mod = todo.pop()
        if mod not in seen and (PKG / f"{mod}.py").exists():
            seen.add(mod)
            todo += list(_imports(PKG / f"{mod}.py"))
    return seen


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_its_script_and_every_module_it_imports():
    for name, stage in _stages().items():
        deps = {d.replace("${pkg}", "src/kdprune") for d in stage["deps"]}
        assert stage["cmd"].startswith(f"python stages/{name}.py"), name
        assert f"stages/{name}.py" in deps, name
        needed = {f"src/kdprune/{m}.py" for m in _closure(REPO / "stages" / f"{name}.py")}
        declared = {d for d in deps if d.startswith("src/kdprune/")}
        assert needed == declared, (name, sorted(needed - declared), sorted(declared - needed))


def test_every_stage_but_validate_depends_on_the_validation_marker():
    for name, stage in _stages().items():
        if name != "validate":
            assert "artifacts/params.ok" in stage["deps"], name


def test_every_params_key_a_stage_logs_is_declared():
    """The keys a stage passes to stage.section() are the params dvc.yaml says it reads."""
    for name, stage in _stages().items():
        text = (REPO / "stages" / f"{name}.py").read_text()
        call = re.search(r"stage\.section\(p, ([^)]*)\)", text)
        if not call:
            continue
        logged = set(re.findall(r'"([\w.]+)"', call.group(1)))
        declared = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}
        if "params.yaml" not in declared:  # `- params.yaml:` reads the whole file
            assert logged <= declared, (name, logged - declared)


def test_every_param_a_stage_script_reads_is_declared():
    """Each `p.<section>.<key>` or `p.<key>` a stage script reads is under its `params:` in dvc.yaml."""
    for name, stage in _stages().items():
        if name == "validate":
            continue
        declared = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}
        if "params.yaml" in declared:
            continue
        text = (REPO / "stages" / f"{name}.py").read_text()
        for section, key in re.findall(r"\bp\.(\w+)(?:\.(\w+))?", text):
            read = f"{section}.{key}" if key else section
            assert section in declared or read in declared, (name, read)
