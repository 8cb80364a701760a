"""Kill an export's worker on one "host" and let a worker of another finish it: two instance
folders, nothing shared but PostgreSQL, a private Redis and the bucket (moto). The upload's
parts are the checkpoints; the object is byte-identical to an uninterrupted export."""

from __future__ import annotations

import gzip
import hashlib
import signal

import pytest
from conftest import create_database, drop_database, require, wait_for
from instances import Instance, kill_group
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

pytestmark = pytest.mark.integration
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
ROWS = 100_000
# Small batches and 64 KiB parts keep the export running for seconds in many parts; a short
# lease and a fast reconciler hand a dead worker's job to the other host within seconds.
CONSUMER_ENV = {"JOB_LEASE": "2", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
                "EXPORT_BATCH_ROWS": "50", "LANE_EXPORTS_RETRIES": "20",
                "LANE_EXPORTS_WORKERS": "1"}


@pytest.fixture(scope="module")
def postgres_url() -> str:
    try:
        create_engine(POSTGRES).connect().close()
    except OperationalError as exc:
        require("PostgreSQL", f"the several-host tests share one database ({exc})")
    return POSTGRES


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, postgres_url, redis_server, s3):
    """Host A (seeded, with the critical consumer) and host B's instance folder: one
    PostgreSQL database, one Redis and one bucket between them."""
    bucket = s3.new_bucket()
    database = create_database(postgres_url)
    shared = {"DATABASE_URL": database, "BROKER_URL": redis_server.url, **s3.settings(bucket)}
    instance = Instance(tmp_path_factory.mktemp("host-a"), ROWS, CONSUMER_ENV, env=shared)
    instance.bucket = bucket
    instance.other = tmp_path_factory.mktemp("host-b")
    yield instance
    instance.db.dispose()
    drop_database(postgres_url, database)


def on(hosts: Instance, host: str) -> dict[str, str]:
    """The environment of a process on `host`: its own instance folder and name."""
    folder = hosts.path if host == "a" else hosts.other
    return {"INSTANCE_PATH": str(folder), "WORKER_HOST": f"host-{host}"}


def upload_parts(s3, hosts: Instance, checkpoint: dict) -> int:
    upload = checkpoint["upload"]
    key = "exports/" + checkpoint["part"].removesuffix(".part")
    listed = s3.client().list_parts(Bucket=hosts.bucket, Key=key, UploadId=upload["id"])
    return len(listed.get("Parts", []))


def export_across_hosts(hosts: Instance, s3, fmt: str) -> int:
    """Host A's worker dies just after uploading its third part's checkpoint (before recording
    it), host B's is SIGKILLed at 40%, host A's again at 70%, host B's finishes."""
    job_id = hosts.new_job(fmt)
    claims: set = {None}

    def running_anew():
        job = hosts.job(job_id)
        return job.state == "running" and job.claimed_by not in claims and job

    with hosts.worker("critical", "critical", **on(hosts, "a")):
        with hosts.worker("exports", "a1", FAULT_INJECT="synced:3", **on(hosts, "a")) as proc:
            wait_for(lambda: proc.poll() is not None, timeout=60, what="the injected fault")
            job = hosts.job(job_id)
            claims.add(job.claimed_by)
            assert job.checkpoint["upload"]["etags"], "two parts were recorded"
            assert upload_parts(s3, hosts, job.checkpoint) > len(
                job.checkpoint["upload"]["etags"]), "a part was uploaded past the checkpoint"
        for name, host, point in (("b1", "b", 0.4), ("a2", "a", 0.7)):
            with hosts.worker("exports", name, **on(hosts, host)) as proc:
                wait_for(lambda point=point: (job := running_anew()) and job.rows_total
                         and job.rows_done >= point * job.rows_total, timeout=60,
                         what=f"host {host} to pass {point:.0%}")
                kill_group(proc, signal.SIGKILL)
                claims.add(hosts.job(job_id).claimed_by)
        with hosts.worker("exports", "b2", **on(hosts, "b")):
            job = wait_for(lambda: (j := hosts.job(job_id)).state in ("succeeded", "failed")
                           and j, timeout=120, what="host B to finish the export")
    assert job.state == "succeeded", job.error
    attempts = hosts.attempts(job_id)
    assert len(attempts) == 4
    assert {a.worker.partition(":")[0] for a in attempts} == {"host-a", "host-b"}
    assert [a.note for a in attempts] == [None] * 4, "every resume went on from the parts"
    return job_id


def object_of(hosts: Instance, s3, job_id: int) -> bytes:
    job = hosts.job(job_id)
    return s3.client().get_object(Bucket=hosts.bucket,
                                  Key=f"exports/{job.file_name}")["Body"].read()


def test_a_csv_killed_on_one_host_is_finished_on_another_byte_identical(hosts, s3):
    job_id = export_across_hosts(hosts, s3, "csv")
    data = object_of(hosts, s3, job_id)
    assert data == hosts.inline_export("csv").read_bytes()
    assert hosts.job(job_id).sha256 == hashlib.sha256(data).hexdigest()
    assert s3.uploads(hosts.bucket) == []


def test_a_csv_gz_killed_on_one_host_is_finished_on_another_byte_identical(hosts, s3):
    job_id = export_across_hosts(hosts, s3, "csv.gz")
    data = object_of(hosts, s3, job_id)
    assert gzip.decompress(data) == hosts.inline_export("csv").read_bytes()
    # a gzip member a page: the same pages are the same bytes
    assert data == hosts.inline_export("csv.gz", EXPORT_BATCH_ROWS="50").read_bytes()
    assert hosts.job(job_id).sha256 == hashlib.sha256(data).hexdigest()
    assert s3.uploads(hosts.bucket) == []
