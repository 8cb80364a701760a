"""The export engine run inline: exact content, tenancy, formula neutralising, resume."""

from __future__ import annotations

import csv
import html
import io
import sqlite3
import threading
import time
from collections.abc import Callable

import pytest
from conftest import login, run_inline, wait_for
from expected import expected_rows
from sqlalchemy import create_engine, text

from jobs import pages, sqlite_pages
from jobs.csvrows import header
from jobs.dataset_file import load as load_datasets
from jobs.sqlite_pages import ReadFailed

DATASETS = load_datasets()  # the shipped demo file


def parse(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


@pytest.mark.parametrize("dataset", ["transactions", "orders"])
def test_export_matches_sql_for_the_users_org_only(app, instance, database_url, dataset):
    job = run_inline(app, "bob@globex.test", dataset)
    assert job.state == "succeeded", job.error
    data = (instance / "exports" / job.file_name).read_bytes()
    assert parse(data) == expected_rows(database_url, dataset, "globex")
    assert job.rows_done == job.rows_total == len(parse(data)) - 1
    assert job.bytes == len(data)
    assert not list((instance / "exports").glob(f"job-{job.id}.*.part"))


def test_filters_are_inclusive_dates_and_status(app, instance, database_url):
    params = {"date_from": "2026-03-01", "date_to": "2026-03-31", "status": "refunded"}
    job = run_inline(app, "alice@acme.test", "transactions", params)
    got = parse((instance / "exports" / job.file_name).read_bytes())
    want = expected_rows(database_url, "transactions", "acme",
                         "and created_at >= ? and created_at < ? and status = ?",
                         ("2026-03-01", "2026-04-01", "refunded"))
    assert got == want and len(want) > 10


def test_csv_is_rfc4180_utf8_with_formulas_neutralised(app, instance):
    job = run_inline(app, "alice@acme.test", "transactions")
    data = (instance / "exports" / job.file_name).read_bytes()
    text = data.decode("utf-8")
    assert text.startswith("id,created_at,amount,")
    assert "\r\n" not in text.replace('"Carriage\r\nreturn"', "")  # rows end in LF
    assert '"Said ""thanks"" twice"' in text
    assert '"Two\nlines"' in text
    assert "Café Zürich — naïve ✓" in text and "東京の注文" in text
    cells = {row[6] for row in parse(data)[1:]}
    for formula in ("=HYPERLINK", "+1 555", "-discount", "@SUM", "\tindented"):
        assert not any(c.startswith(formula) for c in cells), formula
        assert any(c.startswith("'" + formula) for c in cells), formula
    amounts = [row[2] for row in parse(data)[1:]]
    assert any(a.startswith("-") for a in amounts), "negative amounts stay numbers"
    assert all(float(a) == float(a) for a in amounts)


def test_unknown_dataset_fails_for_good_with_a_reason(app):
    job = run_inline(app, "alice@acme.test", "payroll")
    assert job.state == "failed" and "no longer exists" in job.error



@pytest.mark.parametrize("fast", [True, False])
def test_a_failing_sqlite_reader_raises_its_error(app, tmp_path, monkeypatch, fast):
    """The SQLite pages come from jobs._fastcsv or a reader process: either's error reaches
    the attempt. (The statement is prepared here first, on a database that has the table; the
    reader is pointed at a file that is gone.)"""
    if not fast:
        monkeypatch.setattr(sqlite_pages, "_fastcsv", None)
    real = tmp_path / "real.db"
    with sqlite3.connect(real) as db_file:
        db_file.execute("create table orders (id integer primary key, org_id, created_at, "
                        "customer, total, status, items)")
    gone = create_engine(f"sqlite:///{tmp_path / 'gone.db'}",
                         creator=lambda: sqlite3.connect(real))
    with app.app_context(), gone.connect() as conn:
        with pytest.raises(ReadFailed, match="unable to open|failed to open"):
            list(pages.pages(conn, DATASETS["orders"], 1, {}, None, 10))


@pytest.mark.parametrize("size", [1, 7, 100])
def test_pages_cover_every_row_once_also_rows_added_while_reading(app, database_url, size):
    """Pages of any size, read side by side, join into the whole export in key order; a row
    added at the end while the export runs, before its last pages are asked for (25 pages
    and more here: a few are read ahead), is in it too."""
    from jobs.models import db

    dataset = DATASETS["orders"]
    with app.app_context(), db.engine.connect() as conn:
        org = conn.execute(text("select id from organisations where slug = 'globex'")).scalar()
        reader = pages.pages(conn, dataset, org, {}, None, size)
        data = [next(reader).data]
        with db.engine.begin() as other:
            added = other.execute(text(
                "insert into orders (org_id, created_at, customer, total, status, items) "
                "values (:org, '2026-12-01 10:00:00', 'Late, Customer', 1.5, 'paid', 'x') "
                "returning id"), {"org": org}).scalar()
        try:
            data += [page.data for page in reader]
            want = expected_rows(database_url, "orders", "globex")
        finally:
            with db.engine.begin() as other:
                other.execute(text("delete from orders where id = :id"), {"id": added})
    got = parse(header(dataset) + b"".join(bytes(d) for d in data))
    assert got == want and got[-1][0] == str(added)


def _kept_part_after_a_failed_attempt(app, monkeypatch) -> int:
    """A job whose first attempt failed after three pages, retrying with its part kept."""
    from test_cancel_retry import make_job

    from jobs import engine

    real_batches = pages.pages

    def flaky(*args, **kwargs):
        for n, batch in enumerate(real_batches(*args, **kwargs)):
            if n == 3:
                raise RuntimeError("database went away")
            yield batch

    monkeypatch.setattr(pages, "pages", flaky)
    job_id = make_job(app)
    with app.app_context(), pytest.raises(engine.AttemptFailed):
        engine.run(job_id, max_attempts=3)
    monkeypatch.setattr(pages, "pages", real_batches)
    return job_id


@pytest.mark.parametrize("damage", ["missing", "shorter", "changed", "published-zeroed"])
def test_a_resume_never_trusts_a_damaged_file_it_starts_over_and_says_why(
        app, instance, monkeypatch, damage):
    """The class of the 46 MB of NUL bytes: a part (or a published file) that is missing,
    shorter than its checkpoint or not the bytes it recorded is never extended or served."""
    from jobs import engine
    from jobs.models import ExportJob, db

    clean = (instance / "exports" / run_inline(app, "alice@acme.test").file_name).read_bytes()
    job_id = _kept_part_after_a_failed_attempt(app, monkeypatch)
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        checkpoint = job.checkpoint
        path = instance / "exports" / checkpoint["part"]
        if damage == "published-zeroed":  # killed between publish and commit, file damaged
            engine.run(job_id, max_attempts=3)
            db.session.refresh(job)
            path = instance / "exports" / job.file_name
            job.state, job.file_name, job.sha256 = "retrying", None, None
            job.checkpoint = {**job.checkpoint}
            checkpoint = job.checkpoint
            db.session.commit()
            path.write_bytes(b"\0" * path.stat().st_size)
        elif damage == "missing":
            path.unlink()
        elif damage == "shorter":
            with path.open("r+b") as part:
                part.truncate(checkpoint["bytes"] - 1)
        else:
            data = bytearray(path.read_bytes())
            data[10] ^= 1
            path.write_bytes(bytes(data))
        engine.run(job_id, max_attempts=5)
        db.session.refresh(job)
        assert job.state == "succeeded", job.error
        served = (instance / "exports" / job.file_name).read_bytes()
        assert served == clean
        assert job.file_name != checkpoint["part"].removesuffix(".part")
        note = job.attempts[-1].note
        assert note.startswith("Started over from the first row: "), note
        assert not list((instance / "exports").glob(f"job-{job_id}.*.part"))
    admin = login(app.test_client(), "admin@exportdesk.test")
    assert note in html.unescape(admin.get(f"/admin/jobs/{job_id}").get_data(as_text=True))


def test_an_attempt_is_recorded_also_when_the_database_cut_the_connection(app, monkeypatch):
    """The connection dropped (pg_terminate_backend, a failover) so the session cannot even
    roll back: the attempt still ends as failed, and the job is retried at once, not after its
    lease."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.orm import Session
    from test_cancel_retry import load, make_job

    from jobs import engine

    real_batches, real_rollback = pages.pages, Session.rollback

    def rollback_once_cut(self):
        monkeypatch.setattr(Session, "rollback", real_rollback)
        raise sa_exc.OperationalError("ROLLBACK", {}, Exception("server closed the connection"))

    def connection_cut(*args, **kwargs):
        for n, batch in enumerate(real_batches(*args, **kwargs)):
            if n == 2:
                monkeypatch.setattr(Session, "rollback", rollback_once_cut)
                raise sa_exc.OperationalError("SELECT", {}, Exception("terminating connection"))
            yield batch

    monkeypatch.setattr(pages, "pages", connection_cut)
    job_id = make_job(app)
    with app.app_context(), pytest.raises(engine.AttemptFailed) as failed:
        engine.run(job_id, max_attempts=3)
    assert failed.value.retry
    job = load(app, job_id)
    assert job.state == "retrying" and "terminating connection" in job.error
    with app.app_context():
        from jobs.models import ExportJob, db

        attempt = db.session.get(ExportJob, job_id).attempts[0]
        assert attempt.outcome == "failed" and attempt.finished_at is not None


def test_a_sigterm_sqlite_swallows_still_gives_the_job_back_to_the_queue(app, monkeypatch):
    """Huey's worker raises KeyboardInterrupt on SIGTERM; raised inside the source's authorizer
    callback, SQLite swallows it and fails the statement ("not authorized"). The engine knows
    the signal came: the job goes back to the queue, its attempt interrupted, not failed."""
    import os
    import signal
    import threading

    from test_cancel_retry import make_job

    from jobs import engine, source
    from jobs.models import ExportJob, JobAttempt, JobState, db

    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        pytest.skip("the authorizer is SQLite's")
    calls, real = [], source._read_only

    def authorizer(*args):
        if threading.current_thread() is threading.main_thread():
            calls.append(args)
            if len(calls) == 5:  # the handler runs inside this callback
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    def huey_worker(signum, frame):  # what Huey's process worker does with SIGTERM
        raise KeyboardInterrupt

    monkeypatch.setattr(source, "_read_only", authorizer)
    job_id = make_job(app)
    previous = signal.signal(signal.SIGTERM, huey_worker)
    try:
        with app.app_context(), pytest.raises(engine.Interrupted):
            engine.run(job_id, max_attempts=3)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) >= 5
    with app.app_context():
        assert db.session.get(ExportJob, job_id).state == JobState.QUEUED
        attempt = db.session.scalars(db.select(JobAttempt).filter_by(job_id=job_id)).one()
        assert attempt.outcome == "interrupted", attempt.error


def _count_statements() -> tuple[list[float], Callable[[], None]]:
    """When the source's rows are counted (monotonic times), until the returned stop()."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen: list[float] = []

    def before(conn, cursor, statement, *_):
        if "count(" in statement and "FROM transactions" in statement:
            seen.append(time.monotonic())

    event.listen(Engine, "before_cursor_execute", before)
    return seen, lambda: event.remove(Engine, "before_cursor_execute", before)


def test_an_export_done_within_count_after_is_never_counted(app, instance, monkeypatch):
    """The count would cost the export's own CPU for a progress bar nobody sees: an export
    that ends first is not counted, and its total is the rows it wrote."""
    monkeypatch.setitem(app.config, "COUNT_AFTER", 60.0)
    seen, stop = _count_statements()
    try:
        job = run_inline(app, "alice@acme.test", "transactions")
    finally:
        stop()
    data = (instance / "exports" / job.file_name).read_bytes()
    assert job.state == "succeeded" and seen == []
    assert job.rows_done == job.rows_total == len(parse(data)) - 1 > 0
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("count")],
             what="the count's thread to end")  # closed, not left waiting its minute


def test_a_longer_export_is_counted_after_count_after_while_it_runs(app, monkeypatch):
    """From COUNT_AFTER seconds in, the rows are counted; the count is saved with the next
    checkpoint, while the export still runs."""
    from jobs import engine

    monkeypatch.setitem(app.config, "COUNT_AFTER", 0.3)
    counted, saves, delays = threading.Event(), [], []

    class Count(engine._Count):
        def __init__(self, query, after):
            delays.append(after)
            super().__init__(query, after)
            self._counted.add_done_callback(lambda _: counted.set())

    real_save = engine._save

    def save(job_id, claim, commit=True, **values):
        saves.append(values)
        checkpoint = values.get("checkpoint")
        if checkpoint and not checkpoint["complete"]:
            counted.wait(30)  # the first checkpoints wait for the count: it comes mid-export
        real_save(job_id, claim, commit, **values)

    monkeypatch.setattr(engine, "_Count", Count)
    monkeypatch.setattr(engine, "_save", save)
    seen, stop = _count_statements()
    started = time.monotonic()
    try:
        job = run_inline(app, "alice@acme.test", "transactions")
    finally:
        stop()
    assert job.state == "succeeded" and delays == [0.3]
    assert len(seen) == 1 and seen[0] - started >= 0.3
    counted_at = next(i for i, values in enumerate(saves) if "rows_total" in values)
    assert saves[counted_at]["rows_total"] == job.rows_done == job.rows_total
    assert any(values.get("checkpoint") and not values["checkpoint"]["complete"]
               for values in saves[counted_at:]), "saved before the export ended"
