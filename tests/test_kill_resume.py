"""Kill the exports consumer (SIGKILL of its whole process group, or SIGTERM) at several points
of a 200,000-row export and restart it: the final file is byte-identical to an inline export."""

from __future__ import annotations

import gzip
import os
import signal
from contextlib import suppress

import pytest
from conftest import wait_for
from instances import Instance

pytestmark = pytest.mark.integration
ROWS = 200_000
# Tiny batches keep the export running for a few seconds (about 2.5 s here at 10 rows a batch,
# 0.7 s at 50: too quick to stop at 90%); a short lease and a fast reconciler put a killed
# worker's job back on its lane within about three seconds.
BATCH_ROWS = "10"
CONSUMER_ENV = {"JOB_LEASE": "2", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
                "EXPORT_BATCH_ROWS": BATCH_ROWS, "CHECKPOINT_INTERVAL": "0.05",
                "LANE_EXPORTS_RETRIES": "20", "LANE_EXPORTS_WORKERS": "1"}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    instance = Instance(tmp_path_factory.mktemp("big"), ROWS, CONSUMER_ENV)
    yield instance
    instance.close()


def run_with_interruptions(big: Instance, fmt: str, points: list[float],
                           sig: int) -> tuple[int, list]:
    """Start the job, interrupt its consumer with `sig` at each fraction of the rows in
    `points` (0.0: as soon as it runs), restart it each time; returns the job id and what the
    part file held beyond its checkpoint at each kill."""
    job_id = big.new_job(fmt)
    beyond, claims = [], {None}
    with big.worker("critical", "critical"):
        for n, point in enumerate(points):
            with big.worker("exports", f"exports{n}") as proc:
                def reached(point=point):
                    job = big.job(job_id)
                    started = job.state == "running" and job.claimed_by not in claims
                    return started and job.rows_total and job.rows_done >= point * job.rows_total
                wait_for(reached, what=f"attempt {n + 1} to reach {point:.0%}")
                os.killpg(proc.pid, signal.SIGSTOP)  # frozen: it cannot finish while we look
                assert big.job(job_id).state == "running", "the signal lands mid-export"
                os.killpg(proc.pid, sig)
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                proc.wait(30)
                job = big.job(job_id)
                claims.add(job.claimed_by)
                checkpoint = job.checkpoint or {}
                part = big.path / "exports" / (checkpoint.get("part") or "none")
                size = part.stat().st_size if part.exists() else 0
                beyond.append(size - checkpoint.get("bytes", 0))
                assert job.state in ("running", "queued"), job.error
                claims.add(job.claimed_by)
        with big.worker("exports", "exports-last"):
            job = wait_for(lambda: (j := big.job(job_id)).state in ("succeeded", "failed") and j,
                           timeout=120, what="the export to finish")
    assert job.state == "succeeded", job.error
    # (SIGTERM to the whole group, as systemd sends it, may interrupt an attempt twice)
    assert len(big.attempts(job_id)) >= len(points) + 1
    return job_id, beyond


def test_sigkill_at_six_points_gives_a_byte_identical_csv(big):
    job_id, beyond = run_with_interruptions(
        big, "csv", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9], signal.SIGKILL)
    final = big.file(job_id)
    assert final == big.inline_export("csv").read_bytes()
    assert final.count(b"\n") > 100_000 - 1000  # globex holds about half the rows
    assert any(b > 0 for b in beyond), "some kill left bytes past the checkpoint, cut back"
    assert not list((big.path / "exports").glob(f"job-{job_id}.*.part"))


def test_sigkill_csv_gz_resumes_to_a_byte_identical_gzip_of_the_same_csv(big):
    job_id, _ = run_with_interruptions(big, "csv.gz", [0.2, 0.5, 0.8], signal.SIGKILL)
    final = big.file(job_id)
    assert gzip.decompress(final) == big.inline_export("csv").read_bytes()
    # a gzip member a page: the same pages are the same bytes
    assert final == big.inline_export("csv.gz", EXPORT_BATCH_ROWS=BATCH_ROWS).read_bytes()


def test_sigterm_at_three_points_gives_a_byte_identical_csv(big):
    # SIGTERM to the whole group, as systemd sends it: the worker process may be stopped
    # mid-batch (KeyboardInterrupt) and leave bytes past its checkpoint, which are cut back.
    job_id, _ = run_with_interruptions(big, "csv", [0.15, 0.45, 0.75], signal.SIGTERM)
    final = big.file(job_id)
    assert final == big.inline_export("csv").read_bytes()
