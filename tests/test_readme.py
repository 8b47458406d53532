"""The README's commands exist as printed: every dvc, make, kdprune, mlflow and python command of its shell
blocks names a real subcommand, target or script, and every flag it passes is one that command accepts."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
GROUPS = {"exp", "queue", "plots", "metrics", "params", "remote", "cache", "stage", "config", "data"}


def shell_commands() -> list[str]:
    """Every command line of the README's ```sh blocks: comments dropped, `&&`, `;`, `|` split, and the
    commands inside `$(...)` taken out too."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            inner = re.findall(r"\$\(([^()]*)\)", line)
            line = re.sub(r"\"?\$\([^()]*\)\"?", "SUBST", line)
            lines += _split(line) + inner
    return lines


def _split(line: str) -> list[str]:
    """`a && b; c | d` as [a, b, c, d], quotes respected."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    parts, current = [], []
    for token in lex:
        if token in ("&&", ";", "|", "||"):
            parts.append(shlex.join(current))
            current = []
        else:
            current.append(token)
    return [p for p in parts + [shlex.join(current)] if p]


def _ours(command: str) -> bool:
    words = shlex.split(command)
    words = words[1:] if words and words[0] == "eval" else words
    return bool(words) and words[0] in ("dvc", "make", "kdprune", "mlflow", "python")


COMMANDS = [c for c in shell_commands() if _ours(c)]


def test_the_readme_names_the_commands_a_user_runs():
    firsts = {shlex.split(c)[0] for c in COMMANDS}
    assert {"dvc", "make", "kdprune", "mlflow", "python"} <= firsts
    assert "source .venv/bin/activate" in shell_commands()  # what every later command assumes


@functools.cache
def _help(*words: str) -> str:
    exe = str(BIN / words[0]) if words[0] != "python" else sys.executable
    out = subprocess.run([exe, *words[1:], "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (words, out.stderr[-1000:])
    return out.stdout


def _flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("-") and w != "-"]


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text() + (REPO / "scripts/team.mk").read_text()
    return {t for line in re.findall(r"^([\w .%/-]+):(?!=)", text, re.M) for t in line.split()}


# a command answered by `--help` in a process of its own (0.5-5 s each, MLflow's the longest) is slow;
# a make target is read from the Makefile
@pytest.mark.parametrize("command", [c if c.startswith("make ") else pytest.param(c, marks=pytest.mark.slow)
                                     for c in COMMANDS])
def test_every_readme_command_exists_with_the_flags_it_uses(command):
    words = shlex.split(command)
    words = words[1:] if words[0] == "eval" else words
    tool, rest = words[0], words[1:]
    if tool == "make":
        targets = [w for w in rest if not w.startswith("-") and "=" not in w]
        assert targets and set(targets) <= _make_targets(), command
        return
    if tool == "python":
        script = REPO / rest[0]
        assert script.exists(), command
        _help("python", rest[0])
        return
    sub = rest[:2] if tool == "dvc" and rest and rest[0] in GROUPS else rest[:1]
    usage = _help(tool, *sub)
    for flag in _flags(rest[len(sub):]):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", usage, re.M), (command, flag)


SCRIPTS = sorted([*REPO.glob("stages/*.py"), *REPO.glob("bench/*.py"), REPO / "src/kdprune/cli.py",
                  REPO / "scripts/team.py"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_s_help_opens_with_a_whole_sentence(script):
    """`--help` shows a script's first docstring line: three had stopped mid-sentence ("... split into")."""
    import ast

    first = (ast.get_docstring(ast.parse(script.read_text())) or "").splitlines()
    assert first and first[0].endswith(".") and (len(first) == 1 or first[1] == ""), first[:2]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(text: str, first: str) -> list[list[str]]:
    """The markdown table whose header row starts with `first`: its rows' cells, header and rule skipped."""
    return [_cells(line) for line in text[text.index(first):].split("\n\n")[0].splitlines()[2:]]


def test_the_readme_s_digits_table_is_the_committed_comparison():
    """What the committed dvc.lock holds: the cells of reports/comparison.md (in git), as it prints them."""
    readme, report = (REPO / "README.md").read_text(), (REPO / "reports/comparison.md").read_text()
    header = _cells(report.splitlines()[0])
    committed = {row[0]: dict(zip(header, row)) for row in _table(report, "| model |")}
    cols = ["accuracy", "params", "MACs", "ms @256", "speed-up @256 vs student"]
    shown = _table(readme, "| model | " + " | ".join(cols) + " |")
    assert [row[0].split(" (")[0] for row in shown] == list(committed)
    assert [row[1:] for row in shown] == [[committed[row[0].split(" (")[0]][c] for c in cols] for row in shown]


def test_the_readme_s_criteria_table_is_the_score_stage_s_output():
    """plots/score.json as the committed dvc.lock hashes it (it had kept an older host's figures, which a
    later repro changed). The file is a DVC output, not in git: checked where a repro (or `dvc pull`)
    has made it, as in the project's own working copy."""
    import hashlib
    import json

    import yaml

    path = REPO / "plots/score.json"
    outs = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["score"]["outs"]
    locked = next(o["md5"] for o in outs if o["path"] == "plots/score.json")
    if not path.exists() or hashlib.md5(path.read_bytes()).hexdigest() != locked:
        pytest.skip("plots/score.json is not the one dvc.lock holds here (make repro, or dvc pull, makes it)")
    readme = (REPO / "README.md").read_text()
    scores = {d["criterion"]: d for d in json.loads(path.read_text())}
    (spearman, overlap) = _table(readme, "| criterion |")
    names = [c.split(" (")[0] for c in _cells(readme[readme.index("| criterion |"):].splitlines()[0])][1:]
    assert names == sorted(scores, key=lambda c: -scores[c]["spearman"])
    assert spearman[1:] == [f"{scores[c]['spearman']:.2f}" for c in names]
    assert overlap[1:] == [f"{scores[c]['topk_overlap']:.3g}" for c in names]
