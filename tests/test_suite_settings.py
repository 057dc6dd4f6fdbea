"""pytest.ini as a developer uses it: `python -m pytest -q` runs every test, `-m "not slow"` the quick loop, `--lf`
only what failed last."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PLANTED = '''import pytest


def test_fails():
    assert False


@pytest.mark.slow
def test_slow():
    pass


def test_passes():
    pass
'''


def _pytest(folder: Path, *args: str) -> dict[str, int]:
    """Outcome counts of `python -m pytest -q args` run in `folder` (its own pytest.ini and tests/)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *args], cwd=folder,
                         capture_output=True, text=True, timeout=300)
    summary = run.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (failed|passed|deselected|error)", summary)}


@pytest.mark.slow  # three pytest processes
def test_the_default_runs_everything_not_slow_skips_slow_and_lf_reruns_the_failure(tmp_path):
    shutil.copy(ROOT / "pytest.ini", tmp_path / "pytest.ini")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_planted.py").write_text(PLANTED)
    assert _pytest(tmp_path) == {"failed": 1, "passed": 2}
    assert _pytest(tmp_path, "-m", "not slow") == {"failed": 1, "passed": 1, "deselected": 1}
    assert _pytest(tmp_path, "--lf") == {"failed": 1}  # the two that passed are not run again
