"""A full disk hurts one export, not the next: EXPORT_DIR on a real 5 MB filesystem (tmpfs), an
export of about 10 MB fails after its retries with "No space left on device" and leaves no part
behind, so a small export right after it succeeds; the lanes page warns that space is low."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import login, require, wait_for
from instances import Instance

pytestmark = pytest.mark.integration
ROWS = 200_000  # about 100,000 transactions, 10 MB of csv, for the user


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        require("root", "mounting a 5 MB tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        require("mount", f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_one_export_and_not_the_next(tmp_path, small_disk):
    instance = Instance(tmp_path / "instance", ROWS, {
        "EXPORT_DIR": str(small_disk), "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
        "LANE_EXPORTS_RETRIES": "2", "LANE_EXPORTS_RETRY_DELAY": "0.2",
        "EXPORT_BATCH_ROWS": "2000"})
    try:
        with instance.worker("critical", "critical"), instance.worker("exports", "exports"):
            big = instance.new_job("csv")
            failed = wait_for(lambda: (j := instance.job(big)).state in ("failed", "succeeded")
                              and j, timeout=180, what="the large export to end")
            assert failed.state == "failed"
            assert failed.error.startswith("Storage error: No space left on device"), \
                failed.error
            assert len(instance.attempts(big)) == 3, "it was retried, each attempt failed"
            assert sorted(p.name for p in small_disk.iterdir()) == [], "no part left behind"

            small = instance.new_job("csv", "orders", {"date_from": "2026-01-01",
                                                       "date_to": "2026-01-31"})
            done = wait_for(lambda: (j := instance.job(small)).state in ("failed", "succeeded")
                            and j, timeout=120, what="the small export to end")
            assert done.state == "succeeded", done.error
            assert instance.file(small).startswith(b"id,")
    finally:
        instance.close()


def test_the_lanes_page_shows_free_space_and_warns_when_low(app, monkeypatch):
    admin = login(app.test_client(), "admin@exportdesk.test")
    page = admin.get("/admin/lanes").get_data(as_text=True)
    assert 'id="disk"' in page and " free." in page and 'id="disk-low"' not in page
    monkeypatch.setitem(app.config, "DISK_FREE_WARNING", 1 << 60)
    page = admin.get("/admin/lanes").get_data(as_text=True)
    assert 'id="disk-low"' in page and 'role="alert"' in page
