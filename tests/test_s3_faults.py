"""Fault injection at every named step of an export into a bucket (moto): the exports consumer is
SIGKILLed exactly there (after a part is uploaded but not recorded, after the last part, after
the upload is completed but before the job is marked...), then started again. The object is the
one an uninterrupted export writes, its recorded SHA-256 is the object's, and no multipart
upload is left behind."""

from __future__ import annotations

import hashlib

import pytest
from conftest import wait_for
from instances import Instance
from test_faults import content

pytestmark = pytest.mark.integration
ROWS = 40_000  # about 2 MB of csv for the user: some 30 parts of 64 KiB (csv.gz: 4)
CONSUMER_ENV = {"JOB_LEASE": "600", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
                "EXPORT_BATCH_ROWS": "500", "LANE_EXPORTS_WORKERS": "1"}
STREAMED = ["written:3", "synced:3", "checkpointed:3", "final", "published", "committed"]
XLSX = ["written", "final", "published"]
CASES = ([("csv", step) for step in STREAMED] + [("csv.gz", step) for step in STREAMED]
         + [("xlsx", step) for step in XLSX])


@pytest.fixture(scope="module")
def instance(tmp_path_factory, s3):
    bucket = s3.new_bucket()
    instance = Instance(tmp_path_factory.mktemp("s3-faults"), ROWS, CONSUMER_ENV,
                        env=s3.settings(bucket))
    instance.bucket = bucket
    with instance.worker("critical", "critical"):  # reconciles
        yield instance
    instance.close()


@pytest.mark.parametrize("fmt, step", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_a_kill_at_each_step_ends_in_the_right_object(instance, s3, fmt, step):
    job_id = instance.new_job(fmt)
    with instance.worker("exports", f"faulty-{job_id}", FAULT_INJECT=step) as proc:
        proc.wait(120)  # it kills itself at the step
    assert proc.returncode == -9, "the fault fired"
    killed = instance.job(job_id)
    assert killed.state == ("succeeded" if step == "committed" else "running"), killed.error

    with instance.worker("exports", f"after-{job_id}"):
        job = wait_for(lambda: (j := instance.job(job_id)).state in ("succeeded", "failed")
                       and j, timeout=120, what="the export to finish")
    assert job.state == "succeeded", job.error
    served = s3.client().get_object(Bucket=instance.bucket,
                                    Key=f"exports/{job.file_name}")["Body"].read()
    assert content(served, fmt) == content(instance.inline_export(fmt).read_bytes(), fmt)
    assert job.sha256 == hashlib.sha256(served).hexdigest() and job.bytes == len(served)
    assert not [u for u in s3.uploads(instance.bucket)
                if u["Key"].startswith(f"exports/job-{job_id}.")], "no upload left behind"

    attempts = instance.attempts(job_id)
    if step == "committed":
        assert len(attempts) == 1, "nothing ran again"
    else:
        assert [a.outcome for a in attempts] == ["lost", "succeeded"], \
            [(a.outcome, a.error, (a.traceback or "")[-1500:]) for a in attempts]
        assert attempts[1].note is None, "resumed from the upload, not started over"
    if step == "published":  # completed by the killed worker: not written again
        assert job.file_name == f"job-{job_id}.a1.{fmt}"
