"""The linters are part of the test command, at the strictness pyproject.toml sets: ruff (pycodestyle, pyflakes,
import order, bugbear, pyupgrade) over the whole repository; mypy over trainer/, data_tools/, launch/ and bench/
with untyped functions checked too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    proc = run("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_mypy_finds_nothing():
    proc = run("mypy", "--no-incremental")
    assert proc.returncode == 0 and "Success: no issues found" in proc.stdout, proc.stdout[-5000:] + proc.stderr
