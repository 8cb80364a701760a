"""Retention: exactly the old export files go (their jobs become expired), orphans are swept."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest

from jobs import retention
from jobs.models import ExportJob, JobState, db, utcnow
from webapp.auth import find_user


@pytest.fixture
def export_dir(app, tmp_path, monkeypatch):
    """A private EXPORT_DIR, so the sweep sees only this test's files."""
    monkeypatch.setitem(app.config, "EXPORT_DIR", str(tmp_path))
    monkeypatch.setitem(app.config, "EXPORT_RETENTION", timedelta(days=7))
    return tmp_path


def make_job(state: str, age_days: float | None = None) -> ExportJob:
    user = find_user("alice@acme.test")
    finished = utcnow() - timedelta(days=age_days) if age_days is not None else None
    job = ExportJob(user=user, org_id=user.org_id, dataset="orders", params={}, state=state,
                    finished_at=finished)
    db.session.add(job)
    db.session.flush()
    if state == JobState.SUCCEEDED:
        job.file_name = f"job-{job.id}.csv"
    db.session.commit()
    return job


def touch(folder, name: str, hours_old: float = 0.0, size: int = 10) -> None:
    path = folder / name
    path.write_bytes(b"x" * size)
    stamp = time.time() - hours_old * 3600
    os.utime(path, (stamp, stamp))


def test_sweep_removes_exactly_the_old_files(app, export_dir):
    with app.app_context():
        old = make_job(JobState.SUCCEEDED, age_days=8)
        recent = make_job(JobState.SUCCEEDED, age_days=6)
        running = make_job(JobState.RUNNING)
        published = make_job(JobState.RUNNING)  # renamed into place, its commit still to come
        failed = make_job(JobState.FAILED, age_days=1)
        failed_long_ago = make_job(JobState.FAILED, age_days=8)
        retrying = make_job(JobState.RETRYING)
        cancelled = make_job(JobState.CANCELLED, age_days=1)
        ids = [j.id for j in (old, recent, running, published, failed, retrying)]
        old_file = old.file_name
        touch(export_dir, old.file_name, hours_old=8 * 24)
        touch(export_dir, recent.file_name, hours_old=6 * 24)
        touch(export_dir, f"job-{running.id}.a1.csv.part", hours_old=5)  # a long export: kept
        touch(export_dir, f"job-{published.id}.a3.csv", hours_old=2)
        touch(export_dir, f"job-{retrying.id}.a2.csv.gz.part", hours_old=2)  # kept for a retry
        touch(export_dir, f"job-{failed.id}.a1.csv.part", hours_old=2)  # failed: keeps nothing
        touch(export_dir, f"job-{cancelled.id}.a1.xlsx.part", hours_old=2)  # likewise
        touch(export_dir, f"job-{failed_long_ago.id}.csv.part", hours_old=8 * 24)
        touch(export_dir, f"job-{recent.id}.a2.csv.part", hours_old=2)  # orphan of a finished job
        touch(export_dir, "job-99999999.a1.csv.gz.part", hours_old=2)  # no such job
        touch(export_dir, "job-99999998.csv", hours_old=2)  # no such job
        touch(export_dir, f"job-{failed.id}.a2.csv", hours_old=0.1)  # too fresh to judge
        touch(export_dir, "notes.txt", hours_old=100)  # not ours

        report = retention.sweep()

        assert report.expired_jobs == [old.id]
        assert sorted(report.removed_files) == sorted([
            old_file, f"job-{failed_long_ago.id}.csv.part", f"job-{recent.id}.a2.csv.part",
            f"job-{failed.id}.a1.csv.part", f"job-{cancelled.id}.a1.xlsx.part",
            "job-99999999.a1.csv.gz.part", "job-99999998.csv"])
        assert sorted(p.name for p in export_dir.iterdir()) == sorted([
            recent.file_name, f"job-{running.id}.a1.csv.part", f"job-{published.id}.a3.csv",
            f"job-{retrying.id}.a2.csv.gz.part", f"job-{failed.id}.a2.csv", "notes.txt"])
        states = [db.session.get(ExportJob, i).state for i in ids]
        assert states == ["expired", "succeeded", "running", "running", "failed", "retrying"]
        assert db.session.get(ExportJob, old.id).file_name is None

        assert retention.sweep().removed_files == [], "a second sweep finds nothing"


def test_expired_job_page_offers_no_download(app, export_dir):
    from conftest import login

    with app.app_context():
        job = make_job(JobState.SUCCEEDED, age_days=30)
        touch(export_dir, job.file_name, hours_old=30 * 24)
        retention.sweep()
        job_id = job.id
    alice = login(app.test_client(), "alice@acme.test")
    assert alice.get(f"/exports/{job_id}/download").status_code == 404
    page = alice.get(f"/exports/{job_id}").get_data(as_text=True)
    assert "deleted after the retention period" in page and "/download" not in page


def test_disk_counts_every_file_and_the_parts_and_warns_when_free_space_is_low(
        app, export_dir, monkeypatch):
    with app.app_context():
        assert (retention.disk().used, retention.disk().parts) == (0, 0)
        touch(export_dir, "job-1.a1.csv", size=1000)
        touch(export_dir, "job-2.a1.csv.part", size=234)
        disk = retention.disk()
        assert (disk.used, disk.parts) == (1234, 234) and 0 < disk.free <= disk.total
        monkeypatch.setitem(app.config, "DISK_FREE_WARNING", 0)
        assert not retention.disk().low
        monkeypatch.setitem(app.config, "DISK_FREE_WARNING", disk.total + 1)
        assert retention.disk().low
        app.config["EXPORT_DIR"] = str(export_dir / "missing")
        assert retention.disk().used == 0
