"""Retention: old export files are deleted (their jobs become `expired`), orphans are swept,
published files are checked against their jobs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from flask import current_app
from sqlalchemy import select

from jobs.models import ExportJob, JobState, db, utcnow
from jobs.storage import OUR_FILE, storage

log = logging.getLogger(__name__)
BATCH = 500  # jobs per sweep, so one run stays far inside the critical lane's hard timeout


@dataclass
class SweepReport:
    expired_jobs: list[int] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)  # succeeded jobs whose file is not as recorded


@dataclass(frozen=True)
class DiskUse:
    """The bytes export files hold (and their disk's free space), for the lanes page and
    /metrics."""

    used: int  # bytes in finished files and parts
    parts: int  # of which parts (running exports, and those kept for a retry)
    free: int | None  # bytes still free on the disk (None: a bucket, no disk to fill)
    total: int | None
    low: bool  # free below DISK_FREE_WARNING: the next large export may not fit


def disk() -> DiskUse:
    files = storage()
    entries = files.entries()  # listed once: a bucket's listing is a request or more
    used = sum(size for _name, size, _mtime in entries)
    parts = sum(size for name, size, _mtime in entries if name.endswith(".part"))
    free, total = files.free_bytes() or (None, None)
    return DiskUse(used=used, parts=parts, free=free, total=total,
                   low=free is not None and free < current_app.config["DISK_FREE_WARNING"])


def verify(job: ExportJob, digest: bool = True) -> str | None:
    """What is wrong with a succeeded job's published file, as one line ("job 12: job-12.csv:
    missing"), or None when it is as recorded: present, `job.bytes` long and, with `digest`,
    of the recorded SHA-256 (every byte read, 1 MiB at a time). A job with no digest recorded
    (older rows) is checked for presence and size only."""
    files = storage()
    where = f"job {job.id}: {job.file_name}"
    if not job.file_name:
        return f"job {job.id}: no file recorded"
    try:
        size = files.size(job.file_name)
    except FileNotFoundError:
        return f"{where}: missing"
    if size != job.bytes:
        return f"{where}: size differs (expected {job.bytes} bytes, found {size})"
    if not digest or job.sha256 is None:
        return None
    try:
        found = files.sha256(job.file_name)
    except FileNotFoundError:
        return f"{where}: missing"
    if found != job.sha256.lower():
        return f"{where}: digest differs (expected {job.sha256}, found {found})"
    return None


def _keeps(job: ExportJob | None, name: str) -> bool:
    """A file is needed while its job is queued, runs or waits for a retry (parts, or the
    file just published), and a succeeded job's own file until retention expires it. A failed
    or cancelled job keeps nothing: its parts would only fill the disk."""
    if job is None:
        return False
    if job.state in JobState.ACTIVE:
        return True
    return job.state == JobState.SUCCEEDED and job.file_name == name


def sweep(now: datetime | None = None) -> SweepReport:
    """Expire succeeded jobs older than EXPORT_RETENTION, check that every other succeeded
    job's file is there with its recorded size, and delete files no job needs (older than
    ORPHAN_GRACE; in a bucket, also abort the multipart uploads of jobs no longer running).

    The check is cheap (the folder is listed once, for the orphans too; only a file that looks
    wrong is looked at again) so it fits the critical lane's hard timeout; reading every byte
    against the recorded SHA-256 is `flask verify-files`' job.
    """
    now = now or utcnow()
    cutoff = now - current_app.config["EXPORT_RETENTION"]
    files = storage()
    report = SweepReport()
    old = db.session.scalars(
        select(ExportJob)
        .where(ExportJob.state == JobState.SUCCEEDED, ExportJob.finished_at < cutoff)
        .order_by(ExportJob.id).limit(BATCH)
    ).all()
    for job in old:
        if job.file_name:
            files.delete(job.file_name)
            report.removed_files.append(job.file_name)
        job.state = JobState.EXPIRED
        job.file_name = None
        db.session.commit()  # file first, then the row: a crash in between is redone next time
        report.expired_jobs.append(job.id)

    # Jobs before the listing: a job that succeeded had its file renamed into place first.
    published = db.session.execute(
        select(ExportJob.id, ExportJob.file_name, ExportJob.bytes)
        .where(ExportJob.state == JobState.SUCCEEDED, ExportJob.file_name.is_not(None))
    ).all()
    listing = files.entries()
    sizes = {name: size for name, size, _modified in listing}
    for job_id, name, recorded in published:
        if sizes.get(name) == recorded:
            continue
        db.session.rollback()  # look again, now: it may have expired or changed meanwhile
        job = db.session.get(ExportJob, job_id)
        if job is None or job.state != JobState.SUCCEEDED or job.file_name != name:
            continue
        problem = verify(job, digest=False)
        if problem:
            log.warning("retention: %s", problem)
            report.damaged.append(job_id)

    settled = time.time() - current_app.config["ORPHAN_GRACE"]
    for name, _size, modified in listing:
        match = OUR_FILE.fullmatch(name)
        if match is None or modified > settled:
            continue  # not ours, or too fresh to judge
        if not _keeps(db.session.get(ExportJob, int(match.group(1))), name):
            files.delete(name)
            report.removed_files.append(name)
    db.session.rollback()
    if report.expired_jobs or report.removed_files:
        log.info("retention: expired jobs %s, removed %s", report.expired_jobs,
                 report.removed_files)
    return report
