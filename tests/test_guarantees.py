"""Delivery guarantees against the real database and brokers: after-commit dispatch, nothing lost
between database and broker, idempotent tasks, duplicate submissions, retry policy."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pytest
import redis
import requests
from conftest import (
    ROOT,
    TEST_DATABASE_URL,
    csrf_from,
    drop_database,
    free_port,
    login,
    query,
    require,
    wait_for,
)
from expected import expected_rows
from sqlalchemy import create_engine, select, update
from sqlalchemy import exc as sa_exc

from jobs import dispatch, engine, failures, lanes, tasks
from jobs.models import ExportJob, JobAttempt, JobState, db, utcnow
from webapp.auth import create_token, find_user
from webapp.exports import create_export

# Every test starts from a database, an export folder and lanes of its own (conftest.fresh):
# no job another test left can be taken for a duplicate, be sent by a reconcile or be counted.
OTHER_PARAMS = {"status": "open"}  # a request that is not the same as one without parameters


@pytest.fixture
def app(fresh):
    return fresh.app


@pytest.fixture
def instance(fresh):
    return fresh.path


@pytest.fixture
def database_url(fresh):
    return fresh.database_url


@pytest.fixture
def redis_broker(app, redis_server):
    lanes.configure(redis_server.url, Path(app.instance_path))
    lanes.exports.flush()
    yield redis_server
    if redis_server.proc.poll() is not None:
        redis_server.start()
    lanes.configure(app.config["BROKER_URL"], Path(app.instance_path))


def new_job(app, email: str = "alice@acme.test", dataset: str = "orders",
            params: dict | None = None) -> int:
    """A committed job, handed to its lane the normal way (after commit)."""
    with app.app_context():
        job = create_export(find_user(email), dataset, "csv", params or {})
        db.session.commit()
        return job.id


def load(app, job_id: int) -> ExportJob:
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        job.attempts  # noqa: B018 (load them before the session closes)
        db.session.expunge_all()
        return job


def deliver(app, message) -> None:
    """What a worker does with a message: run the task function in its own app context."""
    with app.app_context():
        message.execute()


def run_next(app) -> int:
    message = lanes.exports.dequeue()
    assert message is not None, "nothing on the exports lane"
    deliver(app, message)
    return message.args[0]


# After-commit dispatch


def fast_worker(app, seen: list) -> None:
    """Take the first message off the lane as soon as it appears and look its job up, in the
    worker's own connection, like a consumer on another core would."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        message = lanes.exports.dequeue()
        if message is not None:
            with app.app_context(), db.engine.connect() as conn:
                job_id = message.args[0]
                seen.append((job_id, conn.scalar(select(ExportJob.id)
                                                 .where(ExportJob.id == job_id))))
            return
        time.sleep(0.01)


def test_old_pattern_loses_the_race_after_commit_dispatch_cannot(app, broker):
    """Enqueue inside the transaction (the classic bug): the worker finds no row. Enqueue
    after commit: the message cannot exist before the row is visible."""
    with ThreadPoolExecutor(1) as pool:
        seen: list = []
        worker = pool.submit(fast_worker, app, seen)
        with app.app_context():
            user = find_user("alice@acme.test")
            job = ExportJob(user=user, org_id=user.org_id, dataset="orders", params={})
            db.session.add(job)
            db.session.flush()
            tasks.run_export(job.id)  # the old pattern: send before commit
            worker.result(timeout=30)  # the fast worker got there while we still hold the tx
            old_id = job.id
            db.session.commit()
        assert seen == [(old_id, None)], "the worker should have missed the uncommitted row"

        seen.clear()
        worker = pool.submit(fast_worker, app, seen)
        with app.app_context():
            job = create_export(find_user("alice@acme.test"), "orders", "csv", OTHER_PARAMS)
            time.sleep(0.5)  # give a fast worker every chance to race us
            assert lanes.exports.pending_count() == 0 and not seen, "sent before commit"
            new_id = job.id
            db.session.commit()
        worker.result(timeout=30)
        assert seen == [(new_id, new_id)], "the worker must find the committed row"


def test_rolled_back_submission_is_never_sent(app, broker):
    with app.app_context():
        job = create_export(find_user("alice@acme.test"), "orders", "csv", {})
        job_id = job.id
        db.session.rollback()
        assert db.session.get(ExportJob, job_id) is None
        db.session.commit()  # a later commit must not send the forgotten job either
    assert lanes.exports.pending_count() == 0


# Nothing lost between database and broker


def test_broker_down_at_submit_job_stays_queued_then_reconciler_sends_it(app, alice,
                                                                          redis_broker):
    redis_broker.stop()
    token = csrf_from(alice.get("/").get_data(as_text=True))
    response = alice.post("/exports", data={"dataset": "orders", "format": "csv",
                                            "csrf_token": token})
    assert response.status_code == 303, "a broker outage must not become an error page"
    page = alice.get(response.headers["Location"])
    assert page.status_code == 200 and "queued" in page.get_data(as_text=True).lower()
    job_id = int(response.headers["Location"].rsplit("/", 1)[1])
    assert load(app, job_id).enqueued_at is None

    with app.app_context():
        assert job_id not in dispatch.reconcile(grace=0), "broker still down: nothing sent"
    redis_broker.start()
    with app.app_context():
        assert job_id in dispatch.reconcile(grace=0)
        assert job_id not in dispatch.reconcile(grace=0), "sent once, not on every pass"
    assert load(app, job_id).enqueued_at is not None
    while (message := lanes.exports.dequeue()) is not None:
        deliver(app, message)
    job = load(app, job_id)
    assert job.state == "succeeded", job.error


DIE_AFTER_COMMIT = """
import os
from jobs import dispatch
from webapp import create_app
from webapp.auth import find_user
from webapp.exports import create_export
from jobs.models import db

app = create_app()
with app.app_context():
    # Registered first, so it runs right after COMMIT and before the job is sent.
    dispatch.on_commit(db.session(), lambda: os._exit(0))
    job = create_export(find_user("alice@acme.test"), "orders", "csv", {})
    print(job.id, flush=True)
    db.session.commit()
print("still alive", flush=True)
"""


def test_web_process_dies_between_commit_and_send_then_reconciler_sends_it(fresh, app, broker):
    env = {**fresh.env, "BROKER_URL": lanes.exports.broker_url}
    done = subprocess.run([sys.executable, "-c", DIE_AFTER_COMMIT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "still alive" not in done.stdout, done.stderr
    job_id = int(done.stdout.split()[0])
    job = load(app, job_id)
    assert job.state == "queued" and job.enqueued_at is None
    assert lanes.exports.pending_count() == 0, "the process died before sending"

    with app.app_context():
        assert job_id in dispatch.reconcile(grace=0)
    while (message := lanes.exports.dequeue()) is not None:
        deliver(app, message)
    assert load(app, job_id).state == "succeeded"


def test_reconciler_waits_for_the_grace_period(app, broker):
    with app.app_context():
        user = find_user("alice@acme.test")
        job = ExportJob(user=user, org_id=user.org_id, dataset="orders", params={})
        db.session.add(job)
        db.session.commit()  # recorded, not sent: as if the web process were still sending
        assert job.id not in dispatch.reconcile(grace=3600)
        assert job.id in dispatch.reconcile(grace=0)


def test_worker_that_died_mid_export_is_resumed_by_the_reconciler(app, broker):
    job_id = new_job(app)
    lanes.exports.flush()
    with app.app_context():  # a worker claimed it, then died: its lease lapses
        db.session.execute(update(ExportJob).where(ExportJob.id == job_id).values(
            state=JobState.RUNNING, claimed_by="dead-host:1#1",
            lease_expires_at=utcnow() - timedelta(seconds=1)))
        db.session.add(JobAttempt(job_id=job_id, number=1, worker="dead-host:1"))
        db.session.commit()
        assert job_id in dispatch.reconcile(grace=0)
    assert load(app, job_id).state == "retrying"
    assert run_next(app) == job_id
    job = load(app, job_id)
    assert job.state == "succeeded" and [a.number for a in job.attempts] == [1, 2]


def test_job_whose_workers_keep_dying_gives_up_with_a_reason(app, broker):
    job_id = new_job(app)
    with app.app_context():
        for number in range(1, tasks.EXPORT_ATTEMPTS + 1):
            db.session.add(JobAttempt(job_id=job_id, number=number, worker="dead-host:1"))
        db.session.commit()
        engine.run(job_id, tasks.EXPORT_ATTEMPTS)
    job = load(app, job_id)
    assert job.state == "failed" and "Gave up after" in job.error


# Idempotent tasks


@pytest.mark.parametrize("dataset", ["orders", "transactions"])
def test_same_message_delivered_twice_at_once_runs_the_work_once(app, instance, database_url,
                                                                 broker, dataset):
    params = {"date_from": "2026-03-01", "date_to": "2026-08-31"}
    job_id = new_job(app, dataset=dataset, params=params)
    with app.app_context():
        dispatch.send(job_id)  # a duplicate message, as at-least-once delivery may produce
    messages = [lanes.exports.dequeue(), lanes.exports.dequeue()]
    assert all(m is not None and m.args == (job_id,) for m in messages)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(message) -> None:
        start.wait()
        try:
            deliver(app, message)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(m,)) for m in messages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads), "both runs end cleanly"
    job = load(app, job_id)
    assert job.state == "succeeded", job.error
    assert len(job.attempts) == 1, "the work was done once"
    files = sorted(p.name for p in (instance / "exports").glob(f"job-{job_id}.*"))
    assert files == [job.file_name]
    data = (instance / "exports" / files[0]).read_bytes().decode("utf-8")
    rows = list(csv.reader(io.StringIO(data, newline="")))
    want = expected_rows(database_url, dataset, "acme", "and created_at >= ? and created_at < ?",
                         (params["date_from"], date.fromisoformat(params["date_to"])
                          + timedelta(days=1)))
    assert rows == want and len(want) > 10, "written once, whole"


def test_delivery_while_another_worker_holds_a_live_claim_does_nothing(app):
    job_id = new_job(app)
    with app.app_context():
        db.session.execute(update(ExportJob).where(ExportJob.id == job_id).values(
            state=JobState.RUNNING, claimed_by="other-host:7#1",
            lease_expires_at=utcnow() + timedelta(minutes=5)))
        db.session.commit()
        engine.run(job_id, tasks.EXPORT_ATTEMPTS)
    job = load(app, job_id)
    assert job.state == "running" and job.claimed_by == "other-host:7#1" and not job.attempts


def test_delivery_after_the_job_finished_does_nothing(app, broker):
    job_id = new_job(app)
    assert run_next(app) == job_id
    with app.app_context():
        dispatch.send(job_id)
    assert run_next(app) == job_id
    job = load(app, job_id)
    assert job.state == "succeeded" and len(job.attempts) == 1


def test_worker_that_lost_its_claim_stops_without_touching_the_job(app, instance, database_url,
                                                                   monkeypatch):
    """Another worker takes the job over while this one exports it (as after this one stalled
    past its lease): at its next checkpoint this one gives up, and neither writes to the job
    again nor publishes a file."""
    monkeypatch.setitem(app.config, "EXPORT_BATCH_ROWS", 1)  # a checkpoint per row: it lasts
    job_id = new_job(app, dataset="transactions")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with app.app_context():
                engine.run(job_id, tasks.EXPORT_ATTEMPTS)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    try:
        wait_for(lambda: query(database_url, "select rows_done from export_jobs where id = :id",
                               id=job_id)[0][0] > 0, what="the worker to write rows")
        with app.app_context():  # the takeover: another claim is written over this one's
            taken_at = db.session.execute(
                update(ExportJob).where(ExportJob.id == job_id,
                                        ExportJob.state == JobState.RUNNING)
                .values(claimed_by="new-owner#2").returning(ExportJob.rows_done)).scalar_one()
            db.session.commit()
    finally:
        worker.join(120)
    assert errors == [] and not worker.is_alive(), "the worker stops quietly"
    job = load(app, job_id)
    assert (job.state, job.claimed_by, job.rows_done) == ("running", "new-owner#2", taken_at)
    assert job.file_name is None and job.finished_at is None
    [attempt] = job.attempts
    assert attempt.outcome == "abandoned" and attempt.finished_at is not None
    assert "took the job over" in attempt.error
    assert not [p for p in (instance / "exports").glob(f"job-{job_id}.*")
                if not p.name.endswith(".part")], "nothing published"


# Duplicate submissions


def post_form(client, params: dict):
    token = csrf_from(client.get("/").get_data(as_text=True))
    return client.post("/exports", data={"dataset": "orders", "format": "csv",
                                         "csrf_token": token, **params})


def test_double_click_returns_the_same_job(app, alice):
    params = {"date_from": "2026-02-01"}
    first, second = post_form(alice, params), post_form(alice, params)
    assert first.status_code == second.status_code == 303
    assert first.headers["Location"] == second.headers["Location"]
    page = alice.get(second.headers["Location"]).get_data(as_text=True)
    assert "already asked for this export" in page
    other = post_form(alice, {**params, **OTHER_PARAMS})
    assert other.headers["Location"] != first.headers["Location"], "different request, new job"


def test_concurrent_double_click_creates_one_job(app):
    params = {"date_from": "2026-02-01"}
    clients = [login(app.test_client(), "alice@acme.test") for _ in range(4)]
    tokens = [csrf_from(c.get("/").get_data(as_text=True)) for c in clients]
    start = threading.Barrier(len(clients))

    def click(i: int) -> str:
        start.wait()
        response = clients[i].post("/exports", data={"dataset": "orders", "format": "csv",
                                                     "csrf_token": tokens[i], **params})
        assert response.status_code == 303, response.get_data(as_text=True)
        return response.headers["Location"]

    with ThreadPoolExecutor(len(clients)) as pool:
        locations = list(pool.map(click, range(len(clients))))
    assert len(set(locations)) == 1, locations


def test_same_request_after_the_job_finished_is_a_new_job(app, broker):
    params = {"date_from": "2026-02-01"}
    first = new_job(app, params=params)
    assert run_next(app) == first
    assert new_job(app, params=params) != first


@pytest.fixture
def api(app, client):
    with app.app_context():
        token = create_token(find_user("alice@acme.test"))

    def post(body: dict, key: str | None = None, bearer: str = token):
        headers = {"Authorization": f"Bearer {bearer}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        return client.post("/api/exports", json=body, headers=headers)

    return post


def test_idempotency_key_returns_the_same_job_for_24_hours(app, api):
    body = {"dataset": "orders", "format": "csv", "params": {}}
    key = "order-sync-2026-12-01"
    first = api(body, key)
    assert first.status_code == 202
    job_id = first.json["id"]
    with app.app_context():  # finished jobs count too: the key names the request
        db.session.execute(update(ExportJob).where(ExportJob.id == job_id)
                           .values(state=JobState.SUCCEEDED))
        db.session.commit()
    again = api(body, key)
    assert again.status_code == 202 and again.json["id"] == job_id

    conflict = api({**body, "params": OTHER_PARAMS}, key)
    assert conflict.status_code == 422 and "Idempotency-Key" in conflict.json["error"]

    with app.app_context():
        db.session.execute(update(ExportJob).where(ExportJob.id == job_id)
                           .values(created_at=utcnow() - timedelta(hours=25)))
        db.session.commit()
    later = api(body, key)
    assert later.status_code == 202 and later.json["id"] != job_id


def test_idempotency_keys_belong_to_one_user(app, api):
    with app.app_context():
        bob = create_token(find_user("bob@globex.test"))
    body = {"dataset": "orders", "format": "csv", "params": {}}
    mine = api(body, "shared-key").json["id"]
    assert api(body, "shared-key", bearer=bob).json["id"] != mine


@pytest.mark.parametrize("key", ["", "x" * 201, "tab\there"])
def test_bad_idempotency_key_is_400(api, key):
    response = api({"dataset": "orders"}, key)
    assert response.status_code == 400 and "Idempotency-Key" in response.json["error"]


# Retry policy


def real_connection_error() -> sa_exc.OperationalError:
    """A genuine driver error: connecting to a port where no database listens."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none?connect_timeout=5"
    try:
        create_engine(url).connect()
    except sa_exc.OperationalError as exc:
        return exc
    raise AssertionError("something listens on a free port")


def test_errors_are_classified_transient_or_permanent():
    from jobs.datasets import InvalidParams

    lost_db = real_connection_error()
    assert failures.is_transient(lost_db) and not failures.is_permanent(lost_db)
    try:
        redis.Redis(port=free_port()).ping()
    except redis.ConnectionError as exc:
        assert failures.is_transient(exc)
    assert failures.is_transient(TimeoutError())
    bad = InvalidParams({"date_from": "must be a date like 2026-01-31"})
    assert failures.is_permanent(bad) and not failures.is_transient(bad)
    assert failures.reason(bad) == "Invalid parameters: date_from: must be a date like 2026-01-31"
    assert failures.reason(lost_db).startswith("Temporary failure (OperationalError): ")
    assert "\n" not in failures.reason(lost_db)
    assert [tasks.backoff(5, n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert tasks.backoff(5, 30) == tasks.MAX_RETRY_DELAY


def test_invalid_stored_parameters_fail_at_once_with_a_reason(app):
    with app.app_context():
        user = find_user("alice@acme.test")
        job = ExportJob(user=user, org_id=user.org_id, dataset="orders",
                        params={"date_from": "last tuesday"})
        db.session.add(job)
        db.session.commit()
        job_id = job.id
        with pytest.raises(engine.AttemptFailed) as failure:
            engine.run(job_id, tasks.EXPORT_ATTEMPTS)
    assert failure.value.retry is False
    job = load(app, job_id)
    assert job.state == "failed" and job.finished_at is not None
    assert job.error == "Invalid parameters: date_from: must be a date like 2026-01-31"
    assert [(a.number, a.outcome) for a in job.attempts] == [(1, "failed")]


def test_failure_that_may_pass_is_retried_with_backoff_and_each_attempt_recorded(
        app, instance, broker, monkeypatch):
    """The export folder cannot be written at first (a file stands where its parent folder
    should be, as when a disk is not mounted yet): not a permanent failure, so the attempt is
    recorded and the job retried after a backoff, and the retry succeeds once it can write."""
    unmounted = instance / "volume"
    unmounted.write_bytes(b"")
    exports = unmounted / "exports"
    monkeypatch.setitem(app.config, "EXPORT_DIR", str(exports))
    job_id = new_job(app, dataset="transactions")
    assert run_next(app) == job_id
    job = load(app, job_id)
    assert job.state == "retrying" and job.error.startswith("Storage error: Not a directory")
    assert job.enqueued_at is not None, "the retry message counts as handed to the lane"
    retry = lanes.exports.dequeue()  # the consumer parks it in the schedule until its eta
    delay = (retry.eta - utcnow()).total_seconds()
    assert retry.args == (job_id,) and 0 < delay <= lanes.exports.settings.retry_delay

    unmounted.unlink()  # the disk is there now
    deliver(app, retry)  # the consumer would do this after the backoff delay
    job = load(app, job_id)
    assert job.state == "succeeded", job.error
    assert [(a.number, a.outcome) for a in job.attempts] == [(1, "failed"), (2, "succeeded")]
    assert job.attempts[0].error.startswith("Storage error: Not a directory")
    assert (exports / job.file_name).is_file()
    assert not list(exports.glob(f"job-{job_id}.*.part"))


# SQLite and PostgreSQL give the same bytes


def test_csv_is_byte_identical_on_sqlite_and_postgresql(tmp_path):
    server = TEST_DATABASE_URL or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    try:
        create_engine(server).connect().close()
    except sa_exc.OperationalError as exc:
        require("PostgreSQL", str(exc).splitlines()[0])
    from conftest import create_database, migrate_and_seed

    outputs = {}
    pg = create_database(server)
    try:
        for name, url in (("sqlite", f"sqlite:///{tmp_path / 'x.db'}"), ("postgresql", pg)):
            env = {**os.environ, "INSTANCE_PATH": str(tmp_path / name), "FLASK_APP": "webapp",
                   "DATABASE_URL": url}
            migrate_and_seed(env, 2000)
            for dataset in ("transactions", "orders"):
                out = tmp_path / f"{name}-{dataset}.csv"
                subprocess.run([sys.executable, "-m", "flask", "export", dataset, "--user",
                                "alice@acme.test", "--output", str(out)], cwd=ROOT, env=env,
                               check=True, capture_output=True)
                outputs[name, dataset] = out.read_bytes()
    finally:
        drop_database(server, pg)
    for dataset in ("transactions", "orders"):
        assert outputs["sqlite", dataset] == outputs["postgresql", dataset], dataset
        assert outputs["sqlite", dataset].count(b"\n") > 300


# The whole stack on Redis: broker stopped around a submission


@pytest.mark.integration
def test_stack_on_redis_completes_a_job_submitted_while_redis_was_down(stack_factory,
                                                                       redis_server):
    redis.Redis(port=redis_server.port).flushall()
    stack = stack_factory(BROKER_URL=redis_server.url, RECONCILE_INTERVAL="1",
                          RECONCILE_GRACE="1")
    web = requests.Session()
    token = csrf_from(web.get(f"{stack.url}/login").text)
    web.post(f"{stack.url}/login", data={"email": "alice@acme.test", "password": "exportdesk",
                                         "csrf_token": token})
    token = csrf_from(web.get(f"{stack.url}/").text)
    redis_server.stop()
    try:
        response = web.post(f"{stack.url}/exports", allow_redirects=False, data={
            "dataset": "orders", "format": "csv", "csrf_token": token})
        assert response.status_code == 303, response.text
        job_url = stack.url + response.headers["Location"]
        page = web.get(job_url)
        assert page.status_code == 200 and "state-queued" in page.text
    finally:
        redis_server.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        fragment = web.get(job_url, headers={"HX-Request": "true"}).text
        if "state-succeeded" in fragment:
            break
        assert "state-failed" not in fragment, fragment
        time.sleep(0.25)
    else:
        raise AssertionError("job never ran:\n" + stack.log.read_text(errors="replace"))
    download = web.get(job_url + "/download")
    assert download.status_code == 200 and download.content.startswith(b"id,created_at,")
    assert "reconciler sent 1 job(s)" in stack.log.read_text(errors="replace")
