"""The export engine: keyset batches streamed to a part file, checkpointed, resumable exactly."""

from __future__ import annotations

import csv
import io
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import BinaryIO

from flask import current_app
from sqlalchemy import Connection, update

from jobs.datasets import DATASETS, Dataset, InvalidParams
from jobs.storage import LocalStorage
from webapp.models import ExportJob, JobAttempt, JobState, db, utcnow

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """Stop spreadsheets from running a text cell as a formula (OWASP CSV injection)."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def _format_money(v) -> str:
    return f"{v:.2f}"


def _format_datetime(v: datetime) -> str:
    return v.isoformat(sep=" ", timespec="seconds")


def _format_text(v) -> str:
    return neutralise(str(v))


FORMATTERS: dict[str, Callable] = {
    "int": int,
    "money": _format_money,
    "datetime": _format_datetime,
    "text": _format_text,
}


@dataclass
class Checkpoint:
    """How far a part file is known to be good: on disk (fsynced) and recorded in the job row."""

    last_key: object = None
    rows: int = 0
    bytes: int = 0

    @classmethod
    def from_json(cls, data: dict | None) -> Checkpoint:
        return cls(**data) if data else cls()


class Cancelled(Exception):
    """The job was cancelled while it ran: stop between batches."""


def stream(
    conn: Connection,
    dataset: Dataset,
    org_id: int,
    params: dict[str, str],
    out: BinaryIO,
    start: Checkpoint,
    on_checkpoint: Callable[[Checkpoint], None],
    batch_rows: int = 5000,
    interval: float = 0.5,
) -> Checkpoint:
    """Write the dataset as CSV to `out` from `start`; call on_checkpoint a few times a second.

    `out` must already hold exactly `start.bytes` good bytes. A checkpoint is reported only
    after the bytes it counts are flushed and fsynced, so a resume from it is byte-identical.
    """
    position = Checkpoint(start.last_key, start.rows, start.bytes)
    formatters = [FORMATTERS[c.kind] for c in dataset.columns]
    key_index = dataset.column_names.index(dataset.key)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def emit() -> None:
        data = buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()
        out.write(data)
        position.bytes += len(data)

    def checkpoint() -> None:
        out.flush()
        os.fsync(out.fileno())
        on_checkpoint(Checkpoint(position.last_key, position.rows, position.bytes))

    if position.bytes == 0:
        writer.writerow(dataset.column_names)
        emit()
    last_checkpoint = time.monotonic()
    while True:
        rows = conn.execute(dataset.batch(org_id, params, position.last_key, batch_rows)).all()
        if not rows:
            break
        writer.writerows(
            [fmt(v) if v is not None else "" for fmt, v in zip(formatters, row, strict=True)]
            for row in rows
        )
        emit()
        position.rows += len(rows)
        position.last_key = rows[-1][key_index]
        if time.monotonic() - last_checkpoint >= interval:
            checkpoint()
            last_checkpoint = time.monotonic()
    checkpoint()
    return position


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def storage() -> LocalStorage:
    return LocalStorage(current_app.config["EXPORT_DIR"])


class AttemptFailed(Exception):
    """An attempt ended in error; `retry` says whether the job goes back on its lane."""

    def __init__(self, error: str, retry: bool):
        super().__init__(error)
        self.retry = retry


CLAIMABLE = (JobState.QUEUED, JobState.RETRYING)


def _begin_attempt(job_id: int) -> tuple[ExportJob, JobAttempt] | None:
    """Claim the job for this worker; None when it is not waiting to run (finished, cancelled,
    or already claimed through another message for the same job, e.g. after cancel and retry).

    The claim is one conditional UPDATE, so a cancel committed a moment ago is never overwritten.
    """
    claimed = db.session.execute(
        update(ExportJob)
        .where(ExportJob.id == job_id, ExportJob.state.in_(CLAIMABLE))
        .values(state=JobState.RUNNING)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not claimed:
        db.session.rollback()
        return None
    job = db.session.get(ExportJob, job_id, populate_existing=True)
    attempt = JobAttempt(job=job, number=len(job.attempts) + 1, worker=worker_name())
    job.started_at = job.started_at or utcnow()
    job.error = None
    db.session.add(attempt)
    db.session.commit()
    return job, attempt


def run(job_id: int, max_attempts: int) -> None:
    """Run (or resume) one export job to the end, recording the attempt; raises AttemptFailed."""
    claimed = _begin_attempt(job_id)
    if claimed is None:
        return
    job, attempt = claimed
    files = storage()
    dataset = DATASETS.get(job.dataset)
    try:
        if dataset is None:
            raise InvalidParams({"dataset": f"{job.dataset!r} no longer exists"})
        params = dataset.clean_params(job.params)
        with db.engine.connect() as conn:
            if job.rows_total is None:
                job.rows_total = conn.execute(dataset.count(job.org_id, params)).scalar_one()
                db.session.commit()

            def on_checkpoint(cp: Checkpoint) -> None:
                db.session.refresh(job, ["state"])
                if job.state == JobState.CANCELLED:
                    raise Cancelled
                job.checkpoint = asdict(cp)
                job.rows_done = cp.rows
                job.bytes = cp.bytes
                db.session.commit()

            start = Checkpoint.from_json(job.checkpoint)
            with files.open_part(job.id, job.format, start.bytes) as out:
                stream(conn, dataset, job.org_id, params, out, start, on_checkpoint,
                       current_app.config["EXPORT_BATCH_ROWS"],
                       current_app.config["CHECKPOINT_INTERVAL"])
        job.file_name = files.publish(job.id, job.format)
        job.state = JobState.SUCCEEDED
        attempt.outcome = "succeeded"
    except Cancelled:
        db.session.rollback()
        files.discard_part(job.id, job.format)
        attempt.outcome = "cancelled"
    except Exception as exc:
        db.session.rollback()
        permanent = isinstance(exc, InvalidParams)
        retry = not permanent and attempt.number < max_attempts
        attempt.outcome = "failed"
        attempt.error = job.error = f"{type(exc).__name__}: {exc}"
        job.state = JobState.RETRYING if retry else JobState.FAILED
        if not retry:  # the part file stays, so a retry by hand resumes from the checkpoint
            job.finished_at = utcnow()
        attempt.finished_at = utcnow()
        db.session.commit()
        raise AttemptFailed(job.error, retry) from exc
    attempt.finished_at = utcnow()
    job.finished_at = job.finished_at or attempt.finished_at
    db.session.commit()
