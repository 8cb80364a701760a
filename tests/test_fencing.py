"""Fencing: a worker paused past its lease (SIGSTOP, as a VM pause or a long stall does) while
another takes its job over and publishes the file, then resumed (SIGCONT), can never touch the
published file: it writes on in a part of its own claim, which nobody reads, and gives up at
its next checkpoint."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal

import pytest
from conftest import wait_for
from instances import Instance, pause_outside_a_write

pytestmark = pytest.mark.integration
ROWS = 200_000
CONSUMER_ENV = {"JOB_LEASE": "3", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
                "EXPORT_BATCH_ROWS": "50", "CHECKPOINT_INTERVAL": "0.05",
                "LANE_EXPORTS_RETRIES": "20", "LANE_EXPORTS_WORKERS": "1"}


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    instance = Instance(tmp_path_factory.mktemp("fencing"), ROWS, CONSUMER_ENV)
    yield instance
    instance.close()


@pytest.mark.parametrize("fmt", ["csv", "csv.gz"])
def test_a_worker_paused_past_its_lease_cannot_touch_the_published_file(instance, fmt):
    job_id = instance.new_job(fmt)
    with instance.worker("critical", f"critical-{fmt}"), \
            instance.worker("exports", f"first-{fmt}"):
        job = wait_for(lambda: (j := instance.job(job_id)).state == "running" and j.rows_total
                       and j.rows_done >= 0.3 * j.rows_total and j, what="30 % written")
        paused_pid = int(job.claimed_by.partition("#")[0].rpartition(":")[2])
        # Paused between two writes, as a stall most often strikes; paused inside one, the
        # job's row stays locked until the database ends that connection (docs/guarantees.md).
        pause_outside_a_write(paused_pid, instance.env["DATABASE_URL"], job_id)
        try:
            with instance.worker("exports", f"second-{fmt}"):
                done = wait_for(lambda: (j := instance.job(job_id)).state == "succeeded" and j,
                                timeout=180, what="another worker to finish the export")
                before = instance.file(job_id)
        finally:
            os.kill(paused_pid, signal.SIGCONT)
        wait_for(lambda: instance.attempts(job_id)[0].outcome == "abandoned", timeout=60,
                 what="the resumed worker to find its claim lost, and give up")

    assert instance.attempts(job_id)[-1].outcome == "succeeded"
    after = instance.job(job_id)
    served = instance.file(job_id)
    assert (after.state, after.file_name, after.sha256) == ("succeeded", done.file_name,
                                                            done.sha256)
    assert served == before, "the resumed worker did not write into the published file"
    assert hashlib.sha256(served).hexdigest() == after.sha256
    expected = instance.inline_export("csv").read_bytes()
    assert (gzip.decompress(served) if fmt == "csv.gz" else served) == expected
    assert not list((instance.path / "exports").glob(f"job-{job_id}.*.part"))
