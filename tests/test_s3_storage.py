"""Export files in an S3-compatible bucket (moto's server): multipart exports in every format,
a resume from the recorded parts, presigned and streamed downloads, retention and the sweep of
stale uploads, a bucket that refuses writes, an export too large for its parts."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta

import openpyxl
import pytest
import requests
from conftest import download_url, run_inline
from s3server import PART_SIZE, RefusingProxy, use_bucket

from jobs import engine, lanes, retention, s3_storage
from jobs.checkpoints import Checkpoint, record_checkpoint
from jobs.models import ExportJob, JobState, db, utcnow
from jobs.storage import PartsChanged, Prefix, storage


@pytest.fixture(autouse=True)
def emails_sent_inline(monkeypatch):
    """"Export ready" emails go to the development outbox as they are recorded."""
    monkeypatch.setattr(lanes.critical, "immediate", True)


def object_bytes(s3, bucket: str, job: ExportJob) -> bytes:
    return s3.client().get_object(Bucket=bucket, Key=f"exports/{job.file_name}")["Body"].read()


def sheet(data: bytes) -> list[tuple]:
    return list(openpyxl.load_workbook(io.BytesIO(data), read_only=True).active.values)


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "xlsx"])
def test_an_export_streams_into_a_multipart_upload_and_matches_the_local_file(
        app, instance, s3, bucket, monkeypatch, fmt):
    local = run_inline(app, "alice@acme.test", fmt=fmt)
    assert local.state == "succeeded", local.error
    expected = (instance / "exports" / local.file_name).read_bytes()
    use_bucket(app, s3, bucket, monkeypatch)
    job = run_inline(app, "alice@acme.test", fmt=fmt)
    assert job.state == "succeeded", job.error
    data = object_bytes(s3, bucket, job)
    assert len(data) > 3 * PART_SIZE, "the export spans several parts"
    head = s3.client().head_object(Bucket=bucket, Key=f"exports/{job.file_name}")
    assert head["ETag"].strip('"').endswith(f"-{-(-len(data) // PART_SIZE)}")  # parts, all full
    assert job.sha256 == hashlib.sha256(data).hexdigest() and job.bytes == len(data)
    assert job.rows_done == local.rows_done
    with app.app_context():  # what retention and `flask verify-files` check, read back
        assert retention.verify(db.session.get(ExportJob, job.id)) is None
    if fmt in ("csv", "csv.gz"):  # csv.gz: a gzip member a page, wherever the checkpoints fall
        assert data == expected
    else:
        assert sheet(data) == sheet(expected)
    assert s3.uploads(bucket) == [], "no upload left behind"


@pytest.mark.parametrize("crash_at", [1, 3, 6])
def test_a_resume_elsewhere_continues_the_upload_from_its_parts(app, s3, bucket, monkeypatch,
                                                                 crash_at):
    """Write a byte stream through the part, crash after the `crash_at`-th checkpoint (with
    bytes uploaded past it), resume from the recorded checkpoint with a new storage object (as
    a worker on another host would) and finish: the object is the stream, every byte once."""
    use_bucket(app, s3, bucket, monkeypatch)
    rows = [f"{n},{'x' * (n % 97)}\n".encode() for n in range(60_000)]
    pages = [b"".join(rows[i:i + 500]) for i in range(0, len(rows), 500)]
    whole = b"".join(pages)
    seen: list[Checkpoint] = []

    def write_from(out, start: Checkpoint, stop_after: int | None) -> Checkpoint:
        position = Checkpoint(start.last_key, start.rows)
        first = 0 if start.last_key is None else start.last_key + 1
        for number in range(first, len(pages)):
            out.write(pages[number])
            position.rows += 500
            position.last_key = number
            if out.checkpoint_due(0.0, 0.0):
                record_checkpoint(out, position, seen.append)
                if len(seen) == stop_after:
                    out.write(pages[number + 1])  # past the checkpoint: the worker dies here
                    return position
        record_checkpoint(out, position, seen.append, complete=True)
        return position

    with app.app_context():
        out, problem = storage().open_part(1, 1, "csv")
        assert problem is None
        write_from(out, Checkpoint(), crash_at)
        recorded = Checkpoint.from_json(_json(seen[-1]))
        assert recorded.upload["etags"] and recorded.sha256
        start = recorded.resume_point()
        assert start.bytes <= len(recorded.upload["etags"]) * PART_SIZE
        again = storage()  # another worker
        out, problem = again.open_part(1, 2, "csv", Prefix(start.part, start.bytes, start.sha256,
                                                            start.upload))
        assert problem is None and out.name == recorded.part  # the same upload, continued
        write_from(out, start, None)
        name = again.publish(out)
        assert name == "job-1.a1.csv"
        assert again.sha256(name) == hashlib.sha256(whole).hexdigest()
        assert seen[-1].sha256 == "", "a resumed part cannot know its digest"
    assert s3.uploads(bucket) == []


@pytest.mark.parametrize("change", ["longer", "shorter", "gone"])
def test_a_resume_over_changed_rows_is_refused_so_the_export_starts_over(app, s3, bucket,
                                                                         monkeypatch, change):
    """The rows past the checkpoint changed in the source before the resume: the bytes written
    again differ from those the uploaded parts hold, and joining them would break a row."""
    use_bucket(app, s3, bucket, monkeypatch)
    pages = [b"".join(f"{n},{'y' * (n % 89)}\n".encode() for n in range(i, i + 500))
             for i in range(0, 20_000, 500)]
    seen: list[Checkpoint] = []
    with app.app_context():
        out, _ = storage().open_part(3, 1, "csv")
        number = 0
        while len(seen) < 3:
            out.write(pages[number])
            if out.checkpoint_due(0.0, 0.0):
                record_checkpoint(out, Checkpoint(last_key=number, rows=number + 1), seen.append)
            number += 1
        start = Checkpoint.from_json(_json(seen[-1])).resume_point()
        out, problem = storage().open_part(3, 2, "csv", Prefix(start.part, start.bytes, "",
                                                               start.upload))
        assert problem is None
        edited = {"longer": pages[start.last_key + 1] + b"0,new row\n",
                  "shorter": pages[start.last_key + 1][:-20], "gone": b""}[change]
        with pytest.raises(PartsChanged, match="differ from those in its uploaded parts"):
            out.write(edited)
            out.write(pages[start.last_key + 2])
            out.sync(final=True)
        assert not engine._may_keep_part(PartsChanged("x"), storage()), "the retry starts over"
        storage().discard_parts(3)


def _json(cp: Checkpoint) -> dict:
    """A checkpoint as the job row stores it."""
    from dataclasses import asdict

    return asdict(cp)


def test_a_missing_part_starts_the_export_over_and_says_why(app, s3, bucket, monkeypatch):
    use_bucket(app, s3, bucket, monkeypatch)
    seen: list[Checkpoint] = []
    with app.app_context():
        files = storage()
        out, _ = files.open_part(2, 1, "csv")
        out.write(b"a" * (PART_SIZE + 10))
        record_checkpoint(out, Checkpoint(last_key=1, rows=1), seen.append)
        s3.client().abort_multipart_upload(Bucket=bucket, Key="exports/job-2.a1.csv",
                                           UploadId=seen[-1].upload["id"])
        start = seen[-1].resume_point()
        out, problem = files.open_part(2, 2, "csv", Prefix(start.part, start.bytes, "",
                                                           start.upload))
        assert problem == "the checkpoint's upload of job-2.a1.csv.part is gone"
        assert out.name == "job-2.a2.csv.part" and out.size == 0
        files.discard_parts(2)
    assert s3.uploads(bucket) == []


def download_name(app, job: ExportJob) -> str:
    with app.app_context():
        return db.session.get(ExportJob, job.id).download_name()


@pytest.mark.parametrize("route", ["page", "link"])
def test_a_download_redirects_to_a_presigned_url_with_the_right_filename(
        app, alice, s3, bucket, monkeypatch, route):
    use_bucket(app, s3, bucket, monkeypatch)
    job = run_inline(app, "alice@acme.test", fmt="csv")
    assert job.state == "succeeded", job.error
    url = download_url(app, job, route)
    assert url.startswith(("/exports/", "/d/")), "the emailed link stays the app's own"
    response = alice.get(url)
    assert response.status_code == 302
    signed = response.headers["Location"]
    assert signed.startswith(s3.url) and "X-Amz-Expires=300" in signed
    fetched = requests.get(signed, timeout=30)
    assert fetched.status_code == 200 and fetched.content == object_bytes(s3, bucket, job)
    name = download_name(app, job)
    assert fetched.headers["Content-Disposition"].startswith(f'attachment; filename="{name}"')
    assert fetched.headers["Content-Type"].startswith("text/csv")
    part = requests.get(signed, headers={"Range": "bytes=10-109"}, timeout=30)
    assert part.status_code == 206 and part.content == fetched.content[10:110]
    unchanged = alice.get(url, headers={"If-None-Match": f'"{job.sha256}"'})
    assert unchanged.status_code == 304 and unchanged.headers["ETag"] == f'"{job.sha256}"'
    assert alice.get(url, headers={"If-None-Match": '"0000"'}).status_code == 302


def test_the_streamed_mode_sends_the_object_with_ranges(app, alice, s3, bucket, monkeypatch):
    use_bucket(app, s3, bucket, monkeypatch)
    monkeypatch.setitem(app.config, "DOWNLOAD_REDIRECT", False)
    job = run_inline(app, "alice@acme.test", fmt="csv.gz")
    assert job.state == "succeeded", job.error
    body = object_bytes(s3, bucket, job)
    url = f"/exports/{job.id}/download"
    whole = alice.get(url)
    assert whole.status_code == 200 and whole.data == body
    assert whole.headers["ETag"] == f'"{job.sha256}"'
    assert download_name(app, job) in whole.headers["Content-Disposition"]
    middle = alice.get(url, headers={"Range": f"bytes={PART_SIZE - 5}-{PART_SIZE + 4}"})
    assert middle.status_code == 206 and middle.data == body[PART_SIZE - 5:PART_SIZE + 5]
    tail = alice.get(url, headers={"Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.data == body[-7:]
    resumed = alice.get(url, headers={"Range": "bytes=100-", "If-Range": f'"{job.sha256}"'})
    assert resumed.status_code == 206 and resumed.data == body[100:]
    assert alice.get(url, headers={"If-None-Match": f'"{job.sha256}"'}).status_code == 304
    assert alice.get(url, headers={"Range": f"bytes={len(body) + 1}-"}).status_code == 416


def test_retention_deletes_objects_and_aborts_stale_uploads(app, admin, s3, bucket,
                                                            monkeypatch):
    use_bucket(app, s3, bucket, monkeypatch)
    old = run_inline(app, "alice@acme.test", fmt="csv")
    kept = run_inline(app, "alice@acme.test", fmt="csv")
    client = s3.client()
    with app.app_context():
        db.session.get(ExportJob, old.id).finished_at = utcnow() - timedelta(days=30)
        running, failed = (ExportJob(user_id=old.user_id, org_id=old.org_id,
                                     dataset="transactions", params={}, format="csv",
                                     state=state) for state in (JobState.RUNNING,
                                                                JobState.FAILED))
        db.session.add_all([running, failed])
        db.session.commit()
        for job in (running, failed):
            upload = client.create_multipart_upload(Bucket=bucket,
                                                    Key=f"exports/job-{job.id}.a1.csv")
            client.upload_part(Bucket=bucket, Key=f"exports/job-{job.id}.a1.csv", PartNumber=1,
                               UploadId=upload["UploadId"], Body=b"x" * 1000)
        page = admin.get("/admin/lanes").get_data(as_text=True)
        assert "in unfinished parts), stored in the bucket" in page
        details = admin.get(f"/admin/jobs/{running.id}")
        assert details.status_code == 200 and "part file 1.0 kB" in details.get_data(as_text=True)
        disk = retention.disk()
        assert disk.parts == 2000 and disk.free is None and not disk.low
        assert disk.used == 2000 + old.bytes + kept.bytes

        # moto says every upload began in 2010: an ORPHAN_GRACE of 20 years makes them young
        monkeypatch.setitem(app.config, "ORPHAN_GRACE", 20 * 365 * 86400)
        young = retention.sweep()
        assert young.expired_jobs == [old.id] and young.removed_files == [old.file_name]
        monkeypatch.setitem(app.config, "ORPHAN_GRACE", 3600)
        report = retention.sweep()
        assert report.removed_files == [f"job-{failed.id}.a1.csv.part"]
        assert db.session.get(ExportJob, old.id).state == JobState.EXPIRED
        running_id = running.id
    assert s3.keys(bucket) == [f"exports/{kept.file_name}"]
    assert [u["Key"] for u in s3.uploads(bucket)] == [f"exports/job-{running_id}.a1.csv"]


def test_a_bucket_that_refuses_writes_fails_the_job_and_publishes_nothing(
        app, s3, bucket, monkeypatch):
    use_bucket(app, s3, bucket, monkeypatch)
    proxy = RefusingProxy(s3.url, allowed=2).start()  # two parts pass, then 403
    try:
        monkeypatch.setitem(app.config, "S3_ENDPOINT_URL", proxy.url)
        job = run_inline(app, "alice@acme.test", fmt="csv")
    finally:
        proxy.stop()
    assert proxy.refused >= 1
    assert job.state == "failed"
    assert job.error.startswith(f"Storage error: the bucket {bucket} refused to store job-")
    assert "AccessDenied" in job.error
    assert s3.keys(bucket) == [] and s3.uploads(bucket) == []


def test_an_export_too_large_for_its_parts_fails_saying_why(app, s3, bucket, monkeypatch):
    use_bucket(app, s3, bucket, monkeypatch)
    monkeypatch.setattr(s3_storage, "MAX_PARTS", 3)
    job = run_inline(app, "alice@acme.test", fmt="csv")
    assert job.state == "failed"
    assert job.error.startswith("This export is larger than 3 parts of 0.0625 MiB")
    assert "S3_PART_SIZE" in job.error
    assert s3.keys(bucket) == [] and s3.uploads(bucket) == []


def test_storage_settings_are_checked_at_start_up(monkeypatch):
    from webapp import config

    monkeypatch.setenv("STORAGE_URL", "https://bucket.example.com")
    with pytest.raises(config.ConfigError, match="s3://bucket/prefix"):
        config.load()
    monkeypatch.setenv("STORAGE_URL", "s3://exports/prod")
    monkeypatch.setenv("S3_PART_SIZE", str(PART_SIZE))
    assert config.load()["S3_PART_SIZE"] == PART_SIZE  # outside production: the tests' parts
    monkeypatch.setenv("EXPORTDESK_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "k")
    monkeypatch.setenv("BASE_URL", "https://exports.example.com")
    with pytest.raises(config.ConfigError, match="S3_PART_SIZE must be at least 5242880"):
        config.load()
    monkeypatch.delenv("S3_PART_SIZE")
    assert config.load()["S3_PART_SIZE"] == 16 * 1024**2
