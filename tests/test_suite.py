"""The suite's own machinery: `make test` hands its xdist workers the longest files first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CONFTEST = """
import tests.conftest as ours

ours.LONGEST_FIRST = ("test_z.py", "test_y.py")
pytest_collection_modifyitems = ours.pytest_collection_modifyitems
"""

TEST = """
import os
from pathlib import Path


def test_log():
    with (Path(__file__).parent / "started.log").open("a") as f:
        f.write(f"{{os.environ['PYTEST_XDIST_WORKER']}} {name}\\n")
"""


def test_xdist_workers_start_with_the_longest_files_and_then_take_the_rest_in_name_order(tmp_path: Path) -> None:
    """The order is made where xdist's workers collect (their config has no numprocesses: a check of it
    once skipped the order in every worker, unseen), with `make test`'s own options. Each file logs its
    worker as it runs; xdist deals the files round-robin in collection order."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    names = ("test_a.py", "test_b.py", "test_c.py", "test_y.py", "test_z.py")
    for name in names:
        (tmp_path / name).write_text(TEST.format(name=name))
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path),
           "KDPRUNE_TEST_RUN_SERVICE_DIR": str(tmp_path / "svc")}  # (its conftest makes no folder of its own)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                          "loadfile", "--no-loadscope-reorder", str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line.split() for line in (tmp_path / "started.log").read_text().splitlines()]
    assert sorted(name for _, name in lines) == sorted(names)
    by_worker: dict[str, list[str]] = {}
    for worker, name in lines:
        by_worker.setdefault(worker, []).append(name)
    assert len(by_worker) == 2, by_worker
    # each worker begins with one of the two long files, then takes the rest as dealt: in name order
    assert {files[0] for files in by_worker.values()} == {"test_z.py", "test_y.py"}, by_worker
    for files in by_worker.values():
        assert files[1:] == sorted(files[1:]) and not {"test_z.py", "test_y.py"} & set(files[1:]), by_worker
