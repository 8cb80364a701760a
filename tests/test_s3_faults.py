"""Fault injection at every named step of an export into a bucket (moto): the exports consumer is
SIGKILLed exactly there (after a part is uploaded but not recorded, after the last part, after
the upload is completed but before the job is marked...), then started again. The object is the
one an uninterrupted export writes, its recorded SHA-256 is the object's, and no multipart
upload is left behind."""

from __future__ import annotations

import hashlib

import pytest
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
    with instance.killed_and_resumed(fmt, step) as job:
        assert job.state == "succeeded", job.error
    job_id = job.id
    served = s3.client().get_object(Bucket=instance.bucket,
                                    Key=f"exports/{job.file_name}")["Body"].read()
    assert content(served, fmt) == content(instance.inline_export(fmt).read_bytes(), fmt)
    assert job.sha256 == hashlib.sha256(served).hexdigest() and job.bytes == len(served)
    assert not [u for u in s3.uploads(instance.bucket)
                if u["Key"].startswith(f"exports/job-{job_id}.")], "no upload left behind"

    attempts = instance.attempts_after_kill(job, step)  # published: completed by the killed one
    if step != "committed":
        assert attempts[1].note is None, "resumed from the upload, not started over"
