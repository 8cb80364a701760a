"""Retention: old export files are deleted (their jobs become `expired`), orphans are swept."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime

from flask import current_app
from sqlalchemy import select

from jobs.engine import storage
from webapp.models import ExportJob, JobState, db, utcnow

log = logging.getLogger(__name__)
OUR_FILE = re.compile(r"job-(\d+)\.\w+(\.part)?")
ORPHAN_GRACE = 3600.0  # seconds: a file this fresh may belong to a transaction still in flight
BATCH = 500  # jobs per sweep, so one run stays far inside the critical lane's hard timeout


@dataclass
class SweepReport:
    expired_jobs: list[int] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)


def bytes_used() -> int:
    """Bytes the export folder holds now (finished files and parts): for the admin lanes page."""
    return storage().used_bytes()


def _keeps(job: ExportJob | None, name: str, cutoff: datetime) -> bool:
    """A file is needed while its job runs (parts, or the file just published), until
    retention expires a succeeded job's own file, and, for a retry by hand to resume, a
    failed job's part file for as long as retention keeps files."""
    if job is None:
        return False
    if job.state in JobState.ACTIVE:
        return True
    if job.state == JobState.FAILED and name.endswith(".part"):
        return job.finished_at is not None and job.finished_at >= cutoff
    return job.state == JobState.SUCCEEDED and job.file_name == name


def sweep(now: datetime | None = None) -> SweepReport:
    """Expire succeeded jobs older than EXPORT_RETENTION and delete files no job needs."""
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

    settled = time.time() - ORPHAN_GRACE
    for name, _size, modified in files.entries():
        match = OUR_FILE.fullmatch(name)
        if match is None or modified > settled:
            continue  # not ours, or too fresh to judge
        if not _keeps(db.session.get(ExportJob, int(match.group(1))), name, cutoff):
            files.delete(name)
            report.removed_files.append(name)
    db.session.rollback()
    if report.expired_jobs or report.removed_files:
        log.info("retention: expired jobs %s, removed %s", report.expired_jobs,
                 report.removed_files)
    return report
