"""File digests: recorded on the job, shown, served as ETag and Repr-Digest, checked by
`flask verify-files` and (size only) by retention."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TEST_DATABASE_URL,
    database_for,
    download_url,
    drop_database,
    migrate_and_seed,
    run_inline,
)
from sqlalchemy import create_engine, insert, select
from sqlalchemy.pool import NullPool

from jobs import lanes, retention
from jobs.models import ExportJob, User, db


@pytest.fixture(autouse=True)
def emails_sent_inline(monkeypatch):
    """The "export ready" emails of this module's jobs are sent (to the development outbox) as
    they are recorded, not left waiting for a critical consumer that another test starts."""
    monkeypatch.setattr(lanes.critical, "immediate", True)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_of(app, job: ExportJob) -> Path:
    return Path(app.config["EXPORT_DIR"]) / job.file_name


def published(app, email: str = "alice@acme.test", fmt: str = "csv") -> ExportJob:
    """A finished export of this test's own, as the engine recorded it (detached)."""
    job = run_inline(app, email, "orders", {"status": "open"}, fmt)
    assert job.state == "succeeded", job.error
    assert job.sha256 == sha256_of(file_of(app, job).read_bytes()), "recorded by the engine"
    return job


def queued(app, email: str = "alice@acme.test") -> int:
    """A job that waits (never sent to a lane): it has no file."""
    from webapp.auth import find_user

    with app.app_context():
        user = find_user(email)
        job = ExportJob(user=user, org_id=user.org_id, dataset="orders", params={})
        db.session.add(job)
        db.session.commit()
        return job.id


def set_digest(app, job_id: int, value: str | None) -> None:
    with app.app_context():
        db.session.get(ExportJob, job_id).sha256 = value
        db.session.commit()


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "xlsx"])
def test_the_engine_records_the_digest_and_size_of_the_file_it_publishes(app, fmt):
    job = run_inline(app, "alice@acme.test", "orders", {"status": "open"}, fmt)
    data = file_of(app, job).read_bytes()
    assert job.state == "succeeded" and job.bytes == len(data)
    assert job.sha256 == sha256_of(data)


def test_the_job_pages_show_the_digest(app, alice, admin):
    job = published(app)
    for page in (alice.get(f"/exports/{job.id}").get_data(as_text=True),
                 alice.get(f"/exports/{job.id}", headers={"HX-Request": "true"})
                 .get_data(as_text=True)):
        assert "<dt>SHA-256</dt>" in page
        assert f'<code id="sha256-{job.id}">{job.sha256}</code>' in page
    page = admin.get(f"/admin/jobs/{job.id}").get_data(as_text=True)
    assert f'<dt>SHA-256</dt><dd><code class="digest">{job.sha256}</code></dd>' in page


def test_a_job_without_a_digest_shows_none(app, alice):
    job = published(app)
    set_digest(app, job.id, None)
    page = alice.get(f"/exports/{job.id}").get_data(as_text=True)
    assert "SHA-256" not in page and "Download" in page


def test_the_api_returns_the_digest(app, alice):
    job = published(app)
    assert alice.get(f"/api/jobs/{job.id}").json["sha256"] == job.sha256
    waiting = alice.get(f"/api/jobs/{queued(app)}").json
    assert waiting["state"] == "queued" and waiting["sha256"] is None
    listed = {each["id"]: each for each in alice.get("/api/jobs").json["jobs"]}
    assert listed[job.id]["sha256"] == job.sha256


@pytest.mark.parametrize("route", ["page", "link"])
def test_downloads_carry_the_digest_as_etag_and_repr_digest(app, alice, route):
    job = published(app)
    url = download_url(app, job, route)
    response = alice.get(url)
    body = response.data
    assert response.status_code == 200 and body == file_of(app, job).read_bytes()
    assert response.headers["ETag"] == f'"{sha256_of(body)}"' == f'"{job.sha256}"'
    raw = base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert response.headers["Repr-Digest"] == f"sha-256=:{raw}:"
    assert response.headers["Content-Length"] == str(len(body))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "attachment" in response.headers["Content-Disposition"]

    again = alice.get(url, headers={"If-None-Match": f'"{job.sha256}"'})
    assert again.status_code == 304 and again.data == b""
    assert again.headers["ETag"] == f'"{job.sha256}"'
    other = alice.get(url, headers={"If-None-Match": '"0000"'})
    assert other.status_code == 200 and other.data == body

    part = alice.get(url, headers={"Range": "bytes=10-109"})
    assert part.status_code == 206 and part.data == body[10:110]
    assert part.headers["Content-Range"] == f"bytes 10-109/{len(body)}"
    assert part.headers["ETag"] == f'"{job.sha256}"'
    assert part.headers["Repr-Digest"] == f"sha-256=:{raw}:"  # of the whole file, as RFC 9530
    tail = alice.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.data == body[-5:]
    resumed = alice.get(url, headers={"Range": "bytes=100-", "If-Range": f'"{job.sha256}"'})
    assert resumed.status_code == 206 and resumed.data == body[100:]
    changed = alice.get(url, headers={"Range": "bytes=100-", "If-Range": '"0000"'})
    assert changed.status_code == 200 and changed.data == body
    beyond = alice.get(url, headers={"Range": f"bytes={len(body) + 10}-"})
    assert beyond.status_code == 416

    head = alice.head(url)
    assert head.status_code == 200 and head.data == b""
    assert head.headers["ETag"] == f'"{job.sha256}"'
    assert head.headers["Content-Length"] == str(len(body))


@pytest.mark.parametrize("route", ["page", "link"])
def test_downloads_answer_ranges_head_and_if_modified_since(app, alice, route):
    job = published(app)
    url = download_url(app, job, route)
    whole = alice.get(url)
    body, size = whole.data, len(whole.data)
    assert size > 300 and whole.headers["Content-Length"] == str(size)
    assert whole.headers["Cache-Control"] == "private, no-store"
    for asked, want, first, last in (("bytes=0-99", body[:100], 0, 99),
                                     ("bytes=-100", body[-100:], size - 100, size - 1),
                                     ("bytes=150-249", body[150:250], 150, 249)):
        part = alice.get(url, headers={"Range": asked})
        assert part.status_code == 206 and part.data == want, asked
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}", asked
        assert part.headers["Content-Length"] == str(len(want)), asked
    beyond = alice.get(url, headers={"Range": f"bytes={size}-{size + 99}"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"

    head = alice.head(url)
    assert head.status_code == 200 and head.data == b""
    assert head.headers["Content-Length"] == str(size)

    modified = whole.headers["Last-Modified"]  # when the job published the file
    assert parsedate_to_datetime(modified).replace(tzinfo=None) == job.finished_at.replace(
        microsecond=0)
    same = alice.get(url, headers={"If-Modified-Since": modified})
    assert same.status_code == 304 and same.data == b""
    older = alice.get(url, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
    assert older.status_code == 200 and older.data == body
    assert alice.get(url, headers={"If-None-Match": f'"{job.sha256}"'}).status_code == 304


@pytest.mark.parametrize("route", ["page", "link"])
def test_a_file_without_a_recorded_digest_downloads_without_one(app, alice, route):
    job = published(app)
    set_digest(app, job.id, None)
    response = alice.get(download_url(app, job, route))
    assert response.status_code == 200 and response.data == file_of(app, job).read_bytes()
    assert "ETag" not in response.headers and "Repr-Digest" not in response.headers


def test_a_file_removed_meanwhile_is_404_not_500(app, alice, monkeypatch):
    from jobs.storage import LocalStorage

    job = published(app)

    def gone(self, name):
        raise FileNotFoundError(name)

    monkeypatch.setattr(LocalStorage, "size", gone)
    assert alice.get(f"/exports/{job.id}/download").status_code == 404


def verify_files(env: dict, *job_ids: int) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "flask", "verify-files",
                           *(str(i) for i in job_ids)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, done.stdout.splitlines()


@pytest.fixture
def cli_env(app) -> dict:
    """The test instance's environment for a `flask` subprocess (set by the instance fixture)."""
    return {**os.environ, "FLASK_APP": "webapp", "EXPORT_DIR": app.config["EXPORT_DIR"]}


def test_verify_files_passes_intact_files(app, cli_env):
    jobs = [published(app, fmt=fmt) for fmt in ("csv", "csv.gz", "xlsx")]
    code, lines = verify_files(cli_env, *(job.id for job in jobs))
    assert (code, lines) == (0, ["checked 3 files, 0 problems"])


def test_verify_files_reports_an_altered_a_truncated_and_a_removed_file(app, cli_env):
    altered, truncated, removed, intact = (published(app) for _ in range(4))
    path = file_of(app, altered)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte: the size stays the same
    path.write_bytes(bytes(data))
    found = sha256_of(bytes(data))
    with file_of(app, truncated).open("r+b") as fh:
        fh.truncate(truncated.bytes - 1)
    file_of(app, removed).unlink()

    code, lines = verify_files(cli_env, altered.id, truncated.id, removed.id, intact.id)
    assert code == 1
    assert lines == [
        f"job {altered.id}: {altered.file_name}: digest differs "
        f"(expected {altered.sha256}, found {found})",
        f"job {truncated.id}: {truncated.file_name}: size differs "
        f"(expected {truncated.bytes} bytes, found {truncated.bytes - 1})",
        f"job {removed.id}: {removed.file_name}: missing",
        "checked 4 files, 3 problems",
    ]


def test_verify_files_notes_a_job_without_a_digest_but_does_not_fail(app, cli_env):
    old, new = published(app), published(app)
    set_digest(app, old.id, None)
    code, lines = verify_files(cli_env, old.id, new.id)
    assert code == 0
    assert lines == [f"job {old.id}: {old.file_name}: no digest recorded (size checked)",
                     "checked 2 files, 0 problems, 1 without a digest"]


def test_verify_files_refuses_jobs_with_no_file(app, cli_env):
    waiting = queued(app)
    code, lines = verify_files(cli_env, waiting, 987654321)
    assert code == 1
    assert lines == [f"job {waiting}: no file to check (queued)", "job 987654321: no such job",
                     "checked 0 files, 2 problems"]


def test_verify_files_checks_every_succeeded_job(tmp_path):
    """Without job ids, on an instance of its own: every succeeded job with a file, only them."""
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path), "FLASK_APP": "webapp",
           "DATABASE_URL": database_for(tmp_path), "EXPORT_DIR": str(tmp_path / "exports")}
    migrate_and_seed(env, 40)
    engine = create_engine(env["DATABASE_URL"], poolclass=NullPool)
    folder = tmp_path / "exports"
    folder.mkdir()
    try:
        with engine.begin() as conn:
            user_id, org_id = conn.execute(select(User.id, User.org_id)
                                           .where(User.email == "alice@acme.test")).one()

            def job(state: str, content: bytes | None, digest: bool = True) -> tuple[int, str]:
                job_id = conn.execute(insert(ExportJob.__table__).values(
                    user_id=user_id, org_id=org_id, dataset="orders", params={}, state=state,
                    bytes=len(content or b""))).inserted_primary_key[0]
                name = f"job-{job_id}.csv"
                if content is not None:
                    (folder / name).write_bytes(content)
                    conn.execute(ExportJob.__table__.update().where(ExportJob.id == job_id)
                                 .values(file_name=name,
                                         sha256=sha256_of(content) if digest else None))
                return job_id, name

            good = job("succeeded", b"id,total\n1,2\n")
            undigested = job("succeeded", b"id,total\n3,4\n", digest=False)
            damaged = job("succeeded", b"id,total\n5,6\n")
            job("failed", None)
            job("queued", None)
        code, lines = verify_files(env)
        assert (code, lines) == (0, [
            f"job {undigested[0]}: {undigested[1]}: no digest recorded (size checked)",
            "checked 3 files, 0 problems, 1 without a digest"])

        (folder / damaged[1]).write_bytes(b"id,total\n5,7\n")
        (folder / good[1]).unlink()
        code, lines = verify_files(env)
        assert code == 1
        assert lines[0] == f"job {good[0]}: {good[1]}: missing"
        assert lines[2].startswith(f"job {damaged[0]}: {damaged[1]}: digest differs (expected ")
        assert lines[-1] == "checked 3 files, 2 problems, 1 without a digest"
    finally:
        engine.dispose()
        if TEST_DATABASE_URL:
            drop_database(TEST_DATABASE_URL, env["DATABASE_URL"])


def test_retention_reports_a_truncated_or_missing_file(app, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(app.config, "EXPORT_DIR", str(tmp_path))  # this test's files only
    truncated, removed, intact = (published(app) for _ in range(3))
    with file_of(app, truncated).open("r+b") as fh:
        fh.truncate(10)
    file_of(app, removed).unlink()
    with app.app_context(), caplog.at_level(logging.WARNING, logger="jobs.retention"):
        report = retention.sweep()
        still = [db.session.get(ExportJob, j.id).state for j in (truncated, removed, intact)]
    assert truncated.id in report.damaged and removed.id in report.damaged
    assert intact.id not in report.damaged
    assert still == ["succeeded"] * 3, "a damaged file is reported, not expired"
    messages = caplog.messages
    assert (f"retention: job {truncated.id}: {truncated.file_name}: size differs "
            f"(expected {truncated.bytes} bytes, found 10)") in messages
    assert f"retention: job {removed.id}: {removed.file_name}: missing" in messages
    assert file_of(app, intact).exists() and file_of(app, truncated).exists()
