"""The layer rules of docs/architecture.md hold, and the checker really catches a break of them.

`lint-imports` reads the contracts in pyproject.toml. Each probe copies the sources to a temporary
folder, adds one module that breaks one rule, and expects the checker to name it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def linted() -> subprocess.CompletedProcess:
    return _lint(ROOT)


def test_every_contract_is_kept(linted):
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert re.search(r"Contracts: 4 kept, 0 broken", linted.stdout)


@pytest.mark.parametrize(
    "where, code, broken",
    [
        ("fxtune/graph/probe.py", "from fxtune.adapter import kinds\n", "fxtune.graph.probe -> fxtune.adapter.kinds"),
        ("fxtune/frontends/probe.py", "from fxtune.kit import rewrite\n", "fxtune.frontends.probe -> fxtune.kit.rewrite"),
        ("fxtune/adapter/probe.py", "import passes.lora\n", "fxtune.adapter.probe -> passes.lora"),
        ("passes/probe.py", "from passes import lora\n", "passes.probe -> passes"),
        ("passes/probe2.py", "from fxtune.graph import sites\n", "passes.probe2 -> fxtune.graph.sites"),
    ],
)
def test_a_broken_rule_is_caught(tmp_path, where, code, broken):
    for name in ("fxtune", "passes"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / where).write_text(code)
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout
