"""Declared datasets through real consumers (`flask worker exports` and `flask worker critical`)
reading a separate source database: a table and a SQL dataset export what a direct query
returns; a SIGKILL at a checkpoint resumes into the file an uninterrupted export writes; a
definition changed between the kill and the resume starts the file over under the new one."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
from decimal import Decimal

import pytest
from conftest import ROOT, wait_for
from instances import Instance
from sources import DATASETS_TOML, KEYS, drop_source, ledger, make_source, write_datasets
from test_datasets import as_csv, direct

pytestmark = pytest.mark.integration
USER, ORG = "bob@globex.test", "globex"  # the instance's user: 1,500 of the 3,000 ledger rows
# Pages of 100 rows, a checkpoint after each: 15 for the user's ledger. A lease far longer than
# the test waits: a resume comes from the restarted consumer finding its dead worker.
CONSUMER_ENV = {"JOB_LEASE": "600", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
                "EXPORT_BATCH_ROWS": "100", "CHECKPOINT_INTERVAL": "0",
                "LANE_EXPORTS_WORKERS": "1"}
# v2 of the file: the ledger's key relabelled and its memo column gone (every row changes).
V2 = DATASETS_TOML.replace('label = "Booking"', 'label = "Entry"').replace(
    '  { name = "memo", kind = "text" },\n', "", 1)


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    """An instance whose datasets file declares `ledger` and `refunds` on a team database,
    its organisations given the data keys their rows carry; a critical consumer throughout."""
    path = tmp_path_factory.mktemp("datasets")
    team_db = make_source(path)
    env = {"DATASETS_FILE": str(write_datasets(path)), "SOURCE_DATABASE_URL": team_db}
    instance = Instance(path, 100, CONSUMER_ENV, user=USER, env=env)
    instance.team_db = team_db
    for slug, key in KEYS.items():
        done = subprocess.run([sys.executable, "-m", "flask", "org", "set-key", slug, key],
                              cwd=ROOT, env=instance.env, capture_output=True, text=True)
        assert done.returncode == 0 and key in done.stdout, done.stderr
    with instance.worker("critical", "critical"):  # reconciles: sends every new job
        yield instance
    instance.close()
    drop_source(team_db)


def finished(instance: Instance, job_id: int):
    """The job once it ended, which must be in success."""
    job = wait_for(lambda: (j := instance.job(job_id)).state in ("succeeded", "failed") and j,
                   timeout=180, what=f"job {job_id} to finish")
    assert job.state == "succeeded", job.error
    return job


def rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def killed_then_resumed(instance: Instance, job_id: int, **resume_env: str):
    """Run the job under a consumer that SIGKILLs itself at its third checkpoint, then under a
    new consumer (with `resume_env`) to its end; returns the job as killed and as finished."""
    with instance.worker("exports", f"faulty-{job_id}", FAULT_INJECT="checkpointed:3") as proc:
        proc.wait(180)
    assert proc.returncode == -9, "the fault fired"
    killed = instance.job(job_id)
    assert killed.state == "running" and killed.rows_done == 300, (killed.state, killed.rows_done)
    with instance.worker("exports", f"after-{job_id}", **resume_env):
        job = finished(instance, job_id)
    served = instance.file(job_id)
    assert job.sha256 == hashlib.sha256(served).hexdigest() and job.bytes == len(served)
    attempts = instance.attempts(job_id)
    assert [a.outcome for a in attempts] == ["lost", "succeeded"]
    assert "is gone" in attempts[0].error, "resumed as a dead local worker, not by lease"
    return killed, job


def test_table_and_sql_datasets_export_what_a_direct_query_returns(instance):
    """Both kinds of source, scoped by the organisation's data key and filtered by the
    parameters, end to end: the served csv holds exactly the rows a direct query returns."""
    params = {"amount_min": "100", "amount_max": "500.25", "kind": "card"}
    ledger_job = instance.new_job("csv", dataset="ledger", params=params)
    refunds_job = instance.new_job("csv", dataset="refunds")
    with instance.worker("exports", "exports"):
        finished(instance, ledger_job)
        finished(instance, refunds_job)

    served = rows(instance.file(ledger_job))
    assert served[0] == ["Booking", "Booked at", "amount", "kind", "memo"]
    want = direct(instance.team_db, KEYS[ORG], ledger.c.amount >= 100,
                  ledger.c.amount <= Decimal("500.25"), ledger.c.kind == "card")
    assert want and served[1:] == [as_csv(r) for r in want]

    served = rows(instance.file(refunds_job))
    assert served[0] == ["id", "booked_at", "amount", "memo"]
    want = direct(instance.team_db, KEYS[ORG], ledger.c.kind == "refund")
    assert want and served[1:] == [[c for i, c in enumerate(as_csv(r)) if i != 3] for r in want]


def test_a_kill_at_a_checkpoint_resumes_into_the_uninterrupted_file(instance):
    """The new consumer carries on from the checkpoint (no start over noted) and the file is
    the one `flask export` writes in one go."""
    job_id = instance.new_job("csv", dataset="ledger")
    killed_then_resumed(instance, job_id)
    assert instance.file(job_id) == instance.inline_export("csv", "ledger").read_bytes()
    assert instance.attempts(job_id)[1].note is None, "resumed, not started over"


def test_a_definition_changed_between_kill_and_resume_starts_over_under_the_new_one(instance):
    """Three pages were written under v1; the consumer that resumes reads v2: the file is all
    v2 (never v1's first pages followed by v2's) and the attempt says why it started over."""
    v2 = instance.path / "v2" / "datasets.toml"
    v2.parent.mkdir(exist_ok=True)
    write_datasets(v2.parent, V2)
    job_id = instance.new_job("csv", dataset="ledger")
    killed, job = killed_then_resumed(instance, job_id, DATASETS_FILE=str(v2))

    expected = instance.inline_export("csv", "ledger", DATASETS_FILE=str(v2)).read_bytes()
    assert rows(expected)[0] == ["Entry", "Booked at", "amount", "kind"], "v2 differs from v1"
    assert instance.file(job_id) == expected
    assert "redefined" in instance.attempts(job_id)[1].note
    assert job.definition != killed.definition, "the job records the definition it used"
