"""Fault injection at every named step of an export (FAULT_INJECT, jobs.checkpoints.fault): the
exports consumer is SIGKILLed exactly there, then started again. The file served is the one an
uninterrupted export writes (csv byte for byte, csv.gz decompressed, xlsx cell for cell), its
recorded SHA-256 is the served bytes', and exactly one "ready" email reaches the SMTP server."""

from __future__ import annotations

import gzip
import hashlib
import io

import openpyxl
import pytest
from conftest import wait_for
from instances import Instance

from jobs.models import OutboundEmail

pytestmark = pytest.mark.integration
ROWS = 20_000  # about 10,000 for the user: 20 pages of 500, a checkpoint after each
# A lease far longer than the test waits: a resume here comes from the restarted consumer
# finding its host's dead worker, never from a lapsed lease.
CONSUMER_ENV = {"JOB_LEASE": "600", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
                "EXPORT_BATCH_ROWS": "500", "CHECKPOINT_INTERVAL": "0",
                "LANE_EXPORTS_WORKERS": "1"}
STREAMED = ["written:3", "synced:3", "checkpointed:3", "final", "published", "committed"]
XLSX = ["checkpointed:3", "written", "final", "published", "committed"]
CASES = ([("csv", step) for step in STREAMED] + [("csv.gz", step) for step in STREAMED]
         + [("xlsx", step) for step in XLSX])


@pytest.fixture(scope="module")
def instance(tmp_path_factory, smtp):
    instance = Instance(tmp_path_factory.mktemp("faults"), ROWS,
                        {**CONSUMER_ENV, "SMTP_URL": smtp.url})
    with instance.worker("critical", "critical"):  # sends emails, reconciles
        yield instance
    instance.close()


def content(data: bytes, fmt: str):
    """What a user reads in the file: csv bytes, the csv inside a csv.gz, an xlsx's cells."""
    if fmt == "csv.gz":
        return gzip.decompress(data)
    if fmt == "xlsx":
        sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).active
        return [list(row) for row in sheet.iter_rows(values_only=True)]
    return data


@pytest.mark.parametrize("fmt, step", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_a_kill_at_each_step_ends_in_the_right_file_and_one_email(instance, smtp, fmt, step):
    with instance.killed_and_resumed(fmt, step) as job:
        assert job.state == "succeeded", job.error
        job_id = job.id
        message_id = instance.scalar(OutboundEmail.message_id,
                                     OutboundEmail.key == f"export-ready:{job_id}")
        ready = wait_for(lambda: [m for m in smtp.mailbox.messages
                                  if m["Message-ID"] == message_id],
                         timeout=60, what="the ready email")
    served = instance.file(job_id)
    assert content(served, fmt) == content(instance.inline_export(fmt).read_bytes(), fmt)
    assert job.sha256 == hashlib.sha256(served).hexdigest() and job.bytes == len(served)
    assert len(ready) == 1, "exactly one email"
    assert instance.count(OutboundEmail.__table__, OutboundEmail.job_id == job_id) == 1
    assert not list((instance.path / "exports").glob(f"job-{job_id}.*.part"))

    attempts = instance.attempts_after_kill(job, step)  # committed: only the email was left
    if step != "committed":
        assert "is gone" in attempts[0].error, "resumed as a dead local worker, not by lease"
