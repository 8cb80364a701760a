"""The migrations build exactly the schema the models declare (an index added to a model
without its migration would exist in tests and not in a team's upgraded database)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, TEST_DATABASE_URL, database_for, drop_database


def test_migrations_match_the_models(tmp_path):
    url = database_for(tmp_path)
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path), "FLASK_APP": "webapp",
           "DATABASE_URL": url}
    try:
        for command in (["db", "upgrade"], ["db", "check"]):
            done = subprocess.run([sys.executable, "-m", "flask", *command], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
        assert "No new upgrade operations detected" in done.stdout + done.stderr
    finally:
        if TEST_DATABASE_URL:
            drop_database(TEST_DATABASE_URL, url)
