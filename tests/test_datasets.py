"""Datasets declared in a file, read from the team's own database (separate from the app's):
what they export, who sees which rows, every parameter kind, what a broken file says, what the
read-only source refuses, and `flask datasets check`."""

from __future__ import annotations

import csv
import subprocess
import sys
from decimal import Decimal

import pytest
from conftest import ROOT, TEST_DATABASE_URL, csrf_from, login, run_inline
from sources import KEYS, ledger, make_source, set_data_keys, write_datasets
from sqlalchemy import create_engine, select

from jobs import datasets, source
from jobs.dataset_file import DatasetFileError, load
from jobs.datasets import InvalidParams
from jobs.models import db

POSTGRES = bool(TEST_DATABASE_URL)


@pytest.fixture(scope="module")
def team_db(tmp_path_factory):
    from sources import drop_source

    url = make_source(tmp_path_factory.mktemp("team"))
    yield url
    drop_source(url)


@pytest.fixture
def app(fresh, team_db, tmp_path):
    fresh.app.config.update(DATASETS_FILE=str(write_datasets(tmp_path)),
                            SOURCE_DATABASE_URL=team_db)
    fresh.app.extensions["exportdesk.datasets"] = load(fresh.app.config["DATASETS_FILE"])
    set_data_keys(fresh.app)
    return fresh.app


@pytest.fixture
def instance(fresh):
    return fresh.path


def csrf(client) -> dict[str, str]:
    return {"X-CSRFToken": csrf_from(client.get("/").get_data(as_text=True))}


def exported(app, job) -> list[list[str]]:
    assert job.state == "succeeded", job.error
    path = app.config["EXPORT_DIR"] + "/" + job.file_name
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def direct(team_db: str, tenant: str, *where) -> list[tuple]:
    engine = create_engine(team_db)
    with engine.connect() as conn:
        rows = conn.execute(select(ledger.c.id, ledger.c.booked_at, ledger.c.amount,
                                   ledger.c.kind, ledger.c.memo)
                            .where(ledger.c.tenant == tenant, *where)
                            .order_by(ledger.c.id)).all()
    engine.dispose()
    return rows


def as_csv(row: tuple) -> list[str]:
    return [str(row[0]), row[1].strftime("%Y-%m-%d %H:%M:%S"), f"{row[2]:.2f}",
            *(("" if v is None else v) for v in row[3:])]


def test_a_declared_table_exports_what_a_direct_query_returns(app, team_db):
    job = run_inline(app, "alice@acme.test", "ledger",
                     {"amount_min": "100", "amount_max": "500.25", "kind": "card"})
    rows = exported(app, job)
    assert rows[0] == ["Booking", "Booked at", "amount", "kind", "memo"], "labels as headers"
    want = direct(team_db, KEYS["acme"], ledger.c.amount >= 100, ledger.c.amount <= Decimal(
        "500.25"), ledger.c.kind == "card")
    assert want and rows[1:] == [as_csv(r) for r in want]
    assert job.definition == app.extensions["exportdesk.datasets"]["ledger"].fingerprint


def test_a_sql_dataset_is_read_as_a_subquery_paged_on_its_key(app, team_db):
    job = run_inline(app, "bob@globex.test", "refunds")
    want = direct(team_db, KEYS["globex"], ledger.c.kind == "refund")
    assert [r[:4] for r in exported(app, job)[1:]] == [
        [c for i, c in enumerate(as_csv(r)) if i != 3] for r in want]


def test_a_day_range_counts_both_days_in_the_datasets_time_zone(app, team_db):
    """Paris is UTC+1 in January: 2026-01-03 in Paris is 2026-01-02 23:00 to 2026-01-03
    23:00 UTC."""
    from datetime import datetime

    job = run_inline(app, "alice@acme.test", "ledger",
                     {"booked_from": "2026-01-03", "booked_to": "2026-01-03"})
    want = direct(team_db, KEYS["acme"], ledger.c.booked_at >= datetime(2026, 1, 2, 23),
                  ledger.c.booked_at < datetime(2026, 1, 3, 23))
    assert want and exported(app, job)[1:] == [as_csv(r) for r in want]


def test_a_datetime_range_includes_its_start_not_its_end(app, team_db):
    """Acme's rows are booked every 14 hours from 2026-01-01: rows 6 and 16 fall exactly on
    2026-01-02 18:00 and 2026-01-05 16:00."""
    from datetime import datetime

    job = run_inline(app, "alice@acme.test", "ledger",
                     {"at_from": "2026-01-02T18:00", "at_to": "2026-01-05T16:00"})
    ids = [int(r[0]) for r in exported(app, job)[1:]]
    assert ids == [6, 8, 10, 12, 14], "the start is in, the end is out"
    assert ids == [r[0] for r in direct(team_db, KEYS["acme"],
                                        ledger.c.booked_at >= datetime(2026, 1, 2, 18),
                                        ledger.c.booked_at < datetime(2026, 1, 5, 16))]


CRAFTED = ["' OR '1'='1", "ACME-7' --", "1; DROP TABLE ledger", "%", "_", "\\", "GLOBEX-9",
           "memo 1%' OR tenant LIKE '%"]


@pytest.mark.parametrize("value", CRAFTED)
def test_a_user_never_gets_another_organisations_rows_whatever_the_parameters(app, team_db,
                                                                               value):
    for params in ({"memo": value}, {"kind": value}):
        job = run_inline(app, "alice@acme.test", "ledger", params)
        ids = {int(r[0]) for r in exported(app, job)[1:]}
        acme = {r[0] for r in direct(team_db, KEYS["acme"])}
        assert ids <= acme, "only the organisation's own rows"
    assert len(direct(team_db, KEYS["globex"])) > 0, "the other tenant's rows are intact"


@pytest.mark.parametrize("params, field, message", [
    ({"tenant": "GLOBEX-9"}, "tenant", "is not a parameter"),
    ({"org_id": "2"}, "org_id", "is not a parameter"),
    ({"booked_from": "2026-02-30"}, "booked_from", "must be a date"),
    ({"booked_from": "2026-02-02", "booked_to": "2026-02-01"}, "booked_to",
     "must not be before the start date"),
    ({"at_from": "yesterday"}, "at_from", "must be a date and time"),
    ({"at_from": "2026-01-02T10:00", "at_to": "2026-01-02T09:59"}, "at_to",
     "must not be before the start date"),
    ({"amount_min": "1e999999"}, "amount_min", "out of range"),
    ({"amount_min": "NaN"}, "amount_min", "finite"),
    ({"amount_min": "ten"}, "amount_min", "must be a number"),
    ({"amount_min": "9", "amount_max": "10"}, None, None),
    ({"amount_min": "10", "amount_max": "9"}, "amount_max", "less than the minimum"),
    ({"flagged": "maybe"}, "flagged", "must be yes or no"),
    ({"memo": "x" * 201}, "memo", "too long"),
    ({"memo": "a\x00b"}, "memo", "NUL"),
    ({"kind": ["card"]}, "kind", "must be text"),
])
def test_every_parameter_kind_is_validated(app, params, field, message):
    with app.app_context():
        dataset = app.extensions["exportdesk.datasets"]["ledger"]
        if field is None:
            assert dataset.clean_params(params) == {"amount_min": "9", "amount_max": "10"}
            return
        with pytest.raises(InvalidParams) as caught:
            dataset.clean_params(params)
        assert message in caught.value.errors[field]


def test_a_prefix_is_a_prefix_not_a_pattern_and_a_bool_filters(app, team_db):
    job = run_inline(app, "alice@acme.test", "ledger", {"memo": "memo 1_", "flagged": "yes"})
    assert exported(app, job)[1:] == [], "_ is a character, not a wildcard"
    job = run_inline(app, "alice@acme.test", "ledger", {"memo": "memo 12", "flagged": "yes"})
    want = direct(team_db, KEYS["acme"], ledger.c.memo.startswith("memo 12", autoescape=True),
                  ledger.c.flagged.is_(True))
    assert want and exported(app, job)[1:] == [as_csv(r) for r in want]


def test_the_form_and_the_api_come_from_the_file(app, client):
    login(client, "alice@acme.test")
    page = client.get("/").get_data(as_text=True)
    assert 'name="booked_from"' in page and 'type="date"' in page
    assert 'name="amount_min"' in page and 'type="number"' in page
    assert '<option value="refund"' in page, "choices read from the column"
    body = client.get("/api/datasets").get_json()
    ledger_json = next(d for d in body["datasets"] if d["name"] == "ledger")
    fields = {p["name"]: p for p in ledger_json["params"]}
    assert fields["booked_to"]["not_before"] == "booked_from"
    assert fields["booked_from"]["timezone"] == "Europe/Paris"
    assert fields["kind"]["choices"] == ["card", "refund", "transfer"]
    assert fields["memo"]["match"] == "prefix" and fields["flagged"]["kind"] == "bool"
    assert ledger_json["columns"][0] == {"name": "id", "label": "Booking", "kind": "int"}
    response = client.post("/api/exports", json={"dataset": "ledger", "format": "csv",
                                                 "params": {"amount_min": "x"}},
                           headers=csrf(client))
    assert response.status_code == 400 and "amount_min" in response.get_json()["fields"]


def test_roles_and_scope_all_decide_who_may_export(app, client, tmp_path):
    text = (write_datasets(tmp_path).read_text()
            + '\n[[dataset]]\nname = "everything"\ntable = "ledger"\nkey = "id"\n'
            'scope = "all"\ncolumns = ["id"]\n'
            '\n[[dataset]]\nname = "staff_only"\ntable = "ledger"\nkey = "id"\n'
            'tenant = "tenant"\nroles = ["viewer", "admin"]\ncolumns = [{name="id", kind="int"}]\n')
    text = text.replace('columns = ["id"]', 'columns = [{name="id", kind="int"}]')
    app.extensions["exportdesk.datasets"] = load(write_datasets(tmp_path, text))
    login(client, "alice@acme.test")
    names = [d["name"] for d in client.get("/api/datasets").get_json()["datasets"]]
    assert names == ["ledger", "refunds"]
    response = client.post("/api/exports", json={"dataset": "everything", "format": "csv"},
                           headers=csrf(client))
    assert response.status_code == 400 and "dataset" in response.get_json()["fields"]
    admin = app.test_client()
    login(admin, "admin@exportdesk.test")
    names = [d["name"] for d in admin.get("/api/datasets").get_json()["datasets"]]
    assert names == ["ledger", "refunds", "everything", "staff_only"]
    job = run_inline(app, "admin@exportdesk.test", "everything")
    assert len(exported(app, job)) - 1 == 3_000, "scope all: every tenant's rows"


BROKEN = [
    ("[[dataset]\nname=", None, "is not valid TOML"),
    ('title = "x"', None, "declares no dataset"),
    ('[[dataset]]\nname = "a"\ntable = "t"\ntenant = "o"\ncolumns = ["id"]', "'a'",
     "field 'key': is required"),
    ('[[dataset]]\nname = "a"\nkey = "id"\ntenant = "o"\ncolumns = ["id"]', "'a'",
     "field 'table': give exactly one source"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ncolumns = [{name="id", kind="int"}]',
     "'a'", "field 'tenant': is required"),
    ('[[dataset]]\nname = "a"\ntable = "t; drop table x"\nkey = "id"\ntenant = "o"\n'
     'columns = [{name="id", kind="int"}]', "'a'", "field 'table': must be a table"),
    ('[[dataset]]\nname = "a"\nsql = "DELETE FROM t"\nkey = "id"\ntenant = "o"\n'
     'columns = [{name="id", kind="int"}]', "'a'", "field 'sql': must be one SELECT"),
    ('[[dataset]]\nname = "a"\nsql = "SELECT 1 AS id; DELETE FROM t"\nkey = "id"\n'
     'tenant = "o"\ncolumns = [{name="id", kind="int"}]', "'a'", "must be one statement"),
    ('[[dataset]]\nname = "a"\nsql = "ATTACH DATABASE \'/etc/x\' AS x"\nkey = "id"\n'
     'tenant = "o"\ncolumns = [{name="id", kind="int"}]', "'a'", "must be one SELECT"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ntenant = "o"\n'
     'columns = [{name="id", kind="money"}]', "'a'", "columns[1].kind"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "name"\ntenant = "o"\n'
     'columns = [{name="id", kind="int"}, {name="name", kind="text"}]', "'a'",
     "must be an integer column"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ntenant = "o"\n'
     'columns = [{name="id", kind="int"}]\nparams = [{name="p", kind="choice", column="c"}]',
     "'a'", "params[1].values"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ntenant = "o"\n'
     'columns = [{name="id", kind="int"}]\nparams = [{name="d", kind="date_range", '
     'column="c", timezone="Mars/Olympus"}]', "'a'", "is not a time zone"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ntenant = "o"\n'
     'columns = [{name="id", kind="int"}]\nformats = ["pdf"]', "'a'", "field 'formats'"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ntenant = "o"\n'
     'columns = [{name="id", kind="int"}]\nfilename = "../{secret}"', "'a'", "field 'filename'"),
    ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ntenant = "o"\ncolour = "red"\n'
     'columns = [{name="id", kind="int"}]', "'a'", "field 'colour': is not a dataset field"),
]


@pytest.mark.parametrize("text, dataset, message", BROKEN,
                         ids=[m.split(":")[0][:30] for _, _, m in BROKEN])
def test_a_broken_file_says_which_file_dataset_and_field(tmp_path, text, dataset, message):
    path = write_datasets(tmp_path, text)
    with pytest.raises(DatasetFileError) as caught:
        load(path)
    said = str(caught.value)
    assert str(path) in said and message in said, said
    if dataset:
        assert f"dataset {dataset}" in said, said


def test_the_app_and_the_workers_refuse_to_start_on_a_broken_file(fresh, tmp_path):
    path = write_datasets(tmp_path, '[[dataset]]\nname = "a"\ntable = "t"\ncolumns = ["id"]')
    for command in (["routes"], ["worker", "exports"]):
        run = subprocess.run([sys.executable, "-m", "flask", *command], cwd=ROOT,
                             env={**fresh.env, "DATASETS_FILE": str(path)},
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0
        assert str(path) in run.stderr and "dataset 'a': field 'key'" in run.stderr
        assert "Traceback" not in run.stderr + run.stdout, run.stderr


def test_datasets_check_reports_each_dataset_and_fails_on_a_problem(app, tmp_path):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["datasets", "check"])
    assert result.exit_code == 0, result.output
    assert "ledger (table ledger, tenant tenant): ok" in result.output
    assert "key id: unique, indexed" in result.output and "rows: " in result.output
    assert "refunds (sql, tenant tenant): ok" in result.output
    broken = write_datasets(tmp_path, write_datasets(tmp_path).read_text() + """
[[dataset]]
name = "nope"
table = "ledger"
key = "id"
tenant = "tenant"
columns = [{ name = "id", kind = "int" }, { name = "nope" }]

[[dataset]]
name = "dup"
sql = "SELECT id % 10 AS id, tenant FROM ledger"
key = "id"
tenant = "tenant"
columns = [{ name = "id", kind = "int" }]

[[dataset]]
name = "missing"
table = "no_such_table"
key = "id"
tenant = "tenant"
columns = [{ name = "id", kind = "int" }]
""")
    app.extensions["exportdesk.datasets"] = load(broken)
    result = runner.invoke(args=["datasets", "check"])
    assert result.exit_code == 1
    assert "PROBLEM column 'nope': not in ledger" in result.output, result.output
    assert "PROBLEM key 'id': not unique (3,000 rows, 10 distinct keys)" in result.output
    assert "PROBLEM table or view 'no_such_table': not found" in result.output
    assert "ledger (table ledger, tenant tenant): ok" in result.output


def test_the_source_refuses_writes_attach_and_pragmas(app, team_db, tmp_path):
    engine = source.make_engine(team_db, 5)
    statements = ["DELETE FROM ledger", "UPDATE ledger SET memo = 'x'",
                  "CREATE TABLE stolen (x int)"]
    if engine.dialect.name == "sqlite":
        statements += [f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other",
                       "PRAGMA journal_mode=DELETE", "PRAGMA query_only=0",
                       "SELECT load_extension('/tmp/evil.so')"]
    for statement in statements:
        with engine.connect() as conn, pytest.raises(Exception) as caught:
            conn.exec_driver_sql(statement)
        said = str(caught.value).lower()
        assert "not authorized" in said or "read-only" in said or "readonly" in said, said
    assert len(direct(team_db, KEYS["acme"])) == 1_500, "nothing changed"
    engine.dispose()


def test_a_sql_source_that_writes_fails_its_export_and_changes_nothing(app, team_db, tmp_path):
    text = write_datasets(tmp_path).read_text().replace(
        "SELECT id, tenant, booked_at, amount, memo FROM ledger WHERE kind = 'refund'",
        "WITH gone AS (DELETE FROM ledger RETURNING *) SELECT id, tenant, booked_at, amount, "
        "memo FROM gone")
    app.extensions["exportdesk.datasets"] = load(write_datasets(tmp_path, text))
    job = run_inline(app, "alice@acme.test", "refunds")
    assert job.state in ("failed", "retrying") and job.error, job.state
    assert len(direct(team_db, KEYS["acme"])) == 1_500, "nothing deleted"


def test_a_query_past_the_statement_timeout_fails_with_a_clear_reason(app, team_db, tmp_path):
    slow = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n "
            "WHERE x < 1000000000) SELECT x AS id, 'ACME-7' AS tenant FROM n"
            if team_db.startswith("sqlite") else
            "SELECT g AS id, 'ACME-7' AS tenant FROM generate_series(1, 1000000000) AS g")
    text = (write_datasets(tmp_path).read_text()
            + f'\n[[dataset]]\nname = "slow"\nsql = "{slow}"\nkey = "id"\ntenant = "tenant"\n'
            'columns = [{name = "id", kind = "int"}]\n')
    app.extensions["exportdesk.datasets"] = load(write_datasets(tmp_path, text))
    app.config["SOURCE_STATEMENT_TIMEOUT"] = 1.0
    app.extensions.pop("exportdesk.source", None)
    try:
        job = run_inline(app, "alice@acme.test", "slow")
    finally:
        app.extensions.pop("exportdesk.source").dispose()
    assert job.state == "failed", (job.state, job.error)
    assert "statement timeout" in job.error


def test_a_changed_definition_starts_a_resumed_job_over_and_says_so(app, team_db):
    from jobs import engine
    from jobs.models import ExportJob, JobAttempt
    from webapp.auth import find_user

    with app.app_context():
        user = find_user("alice@acme.test")
        job = ExportJob(user=user, org_id=user.org_id, dataset="ledger", params={},
                        format="csv", definition="0" * 64, rows_done=40, bytes=1234,
                        checkpoint={"last_key": 80, "rows": 40, "bytes": 1234, "sha256": "0",
                                    "part": "job-1.a1.csv.part", "complete": False})
        db.session.add(job)
        db.session.commit()
        engine.run(job.id, max_attempts=1)
        db.session.refresh(job)
        note = db.session.scalar(select(JobAttempt.note).where(JobAttempt.job_id == job.id))
    assert "redefined" in note
    assert [int(r[0]) for r in exported(app, job)[1:]] == [r[0] for r in direct(
        team_db, KEYS["acme"])], "every row, from the first"


def test_the_demo_file_is_what_ships_and_passes_its_own_check(tmp_path):
    datasets = load()
    assert list(datasets) == ["transactions", "orders"]
    assert [f.name for f in datasets["transactions"].params] == ["date_from", "date_to",
                                                                 "status"]


def test_max_rows_and_formats_are_the_datasets_limits(app, client, tmp_path, monkeypatch):
    from jobs import engine

    text = write_datasets(tmp_path).read_text().replace(
        'description = "Bookings of the team\'s own ledger."',
        'description = "Bookings of the team\'s own ledger."\nmax_rows = 10\nformats = ["csv"]')
    app.extensions["exportdesk.datasets"] = load(write_datasets(tmp_path, text))
    monkeypatch.setitem(app.config, "COUNT_AFTER", 60.0)
    delays = []
    monkeypatch.setattr(engine, "_Count", lambda query, after, count=engine._Count: (
        delays.append(after) or count(query, after)))
    job = run_inline(app, "alice@acme.test", "ledger")
    assert job.state == "failed" and "allows at most 10" in job.error, job.error
    assert delays == [0.0], "a limit to hold the export to: counted at once, not after a minute"
    assert run_inline(app, "alice@acme.test", "ledger", {"amount_max": "5"}).state == "succeeded"
    login(client, "alice@acme.test")
    response = client.post("/api/exports", json={"dataset": "ledger", "format": "xlsx"},
                           headers=csrf(client))
    assert response.status_code == 400 and "format" in response.get_json()["fields"]


UNTYPED = """
[[dataset]]
name = "typed"
table = "ledger"
key = "id"
tenant = "tenant"
columns = [{ name = "id", kind = "int" }, { name = "booked_at", kind = "datetime" },
           { name = "amount", kind = "decimal", scale = 2 }, { name = "memo", kind = "text" },
           { name = "flagged", kind = "bool" }]

[[dataset]]
name = "untyped"
table = "ledger"
key = "id"
tenant = "tenant"
columns = ["id", "booked_at", "amount", "memo", "flagged"]

[[dataset]]
name = "untyped_sql"
sql = "SELECT id, tenant, amount, flagged FROM ledger"
key = "id"
tenant = "tenant"
columns = [{ name = "id", kind = "int" }, "amount", "flagged"]
"""


def test_kinds_the_file_leaves_out_are_read_from_the_source_schema(app, team_db, tmp_path):
    app.extensions["exportdesk.datasets"] = load(write_datasets(tmp_path, UNTYPED))
    with app.app_context():
        typed = datasets.registry()
    assert [(c.name, c.kind, c.scale) for c in typed["untyped"].columns] == [
        ("id", "int", None), ("booked_at", "datetime", None), ("amount", "decimal", 2),
        ("memo", "text", None), ("flagged", "bool", None)]
    sql_kinds = [(c.kind, c.scale) for c in typed["untyped_sql"].columns]
    # PostgreSQL says a query's result types; SQLite cannot (docs/datasets.md: declare them)
    assert sql_kinds == [("int", None), *([("decimal", 2), ("bool", None)] if POSTGRES
                                          else [("text", None)] * 2)]
    # the kinds read are part of the definition: a type changed under a job changes it
    assert typed["untyped"].fingerprint != load(write_datasets(tmp_path, UNTYPED))[
        "untyped"].fingerprint
    one, other = (exported(app, run_inline(app, "alice@acme.test", name))
                  for name in ("typed", "untyped"))
    assert one == other and len(one) > 100, "the same file as with the kinds declared"


def test_a_kind_read_from_the_schema_that_cannot_work_is_a_clear_problem(app, tmp_path,
                                                                          client):
    app.extensions["exportdesk.datasets"] = load(write_datasets(tmp_path, """
[[dataset]]
name = "by_memo"
table = "ledger"
key = "memo"
tenant = "tenant"
columns = ["memo", "amount"]
"""))
    result = app.test_cli_runner().invoke(args=["datasets", "check"])
    assert result.exit_code == 1
    assert ("PROBLEM dataset 'by_memo': field 'key': must be an integer column (pages are "
            "read after its last value) (with the kinds read from the source database)"
            in result.output), result.output
    login(client, "alice@acme.test")
    page = client.get("/")
    assert page.status_code == 503
    assert "flask datasets check" in page.get_data(as_text=True)
