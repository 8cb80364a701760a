"""The one-way rule (docs/architecture.md): `jobs` never imports `webapp`, checked by
import-linter's contract in pyproject.toml, and the check fails when the rule is broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=where, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(where)})


def test_the_core_does_not_import_the_web_app():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_the_check_fails_when_a_jobs_module_imports_webapp(tmp_path):
    for package in ("jobs", "webapp"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "migrations"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "jobs" / "retention.py").open("a") as module:
        module.write("\n\ndef _late():\n    from webapp import emails  # noqa: F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "jobs.retention -> webapp.emails" in done.stdout
