"""Hardening of what users feed kdflow (issue 12 items 4-7): bad pipelines are refused by
``kdflow validate`` with their key path (exit 2), broken inputs are clean errors naming the file
(exit 1), and values that make no sense are refused or warned about with the count."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_plain_pytest_collects_the_modules_that_import_from_tests() -> None:
    """``pytest`` (not only ``python -m pytest``) imports ``from tests.x import y``: no module is
    skipped with a collection error by a user's runner."""
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                     if re.search(r"^from tests[.]", p.read_text(), re.M))
    assert modules
    pytest_bin = Path(sys.executable).parent / "pytest"
    proc = subprocess.run([str(pytest_bin), "--collect-only", "-q", "-p", "no:cacheprovider", *modules],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " error" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
