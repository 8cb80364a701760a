"""The admin pages of one job and one email: times in one format, the checkpoint as
labelled fields, audit actions in words, sub-second durations, the email's message."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta

from jobs.models import AdminAction, ExportJob, JobAttempt, JobState, OutboundEmail, db
from webapp import admin_text, times
from webapp.auth import find_user

WHEN = datetime(2026, 12, 2, 13, 4, 5, 678901)
EXACT = "2026-12-02 13:04:05 UTC"


def make_job(app, **values) -> int:
    with app.app_context():
        user = find_user("alice@acme.test")
        job = ExportJob(user=user, org_id=user.org_id, dataset="transactions", params={},
                        **values)
        db.session.add(job)
        db.session.commit()
        return job.id


def test_one_time_format_durations_and_relative_times():
    assert times.exact(WHEN) == EXACT
    assert times.exact(None) == "–"
    assert times.duration(WHEN, WHEN + timedelta(milliseconds=300)) == "under 1 s"
    assert times.duration(WHEN, WHEN + timedelta(seconds=42.5)) == "42 s"
    assert times.duration(WHEN, WHEN + timedelta(minutes=3, seconds=5)) == "3 min 05 s"
    assert times.duration(WHEN, WHEN + timedelta(hours=2, minutes=4)) == "2 h 04 min"
    assert times.ago(WHEN, WHEN + timedelta(seconds=3)) == "just now"
    assert times.ago(WHEN, WHEN + timedelta(minutes=3, seconds=50)) == "3 min ago"
    assert times.ago(WHEN, WHEN + timedelta(hours=5)) == "5 h ago"
    assert times.ago(WHEN, WHEN + timedelta(days=1)) == "1 day ago"
    assert times.ago(WHEN, WHEN + timedelta(days=3)) == "3 days ago"
    assert admin_text.action_words("retry_from_scratch") == "retried from scratch"
    assert admin_text.action_words("user.role") == "changed the role"
    assert admin_text.action_words("something_new") == "something new"


def test_a_job_page_shows_times_checkpoint_duration_and_actions_in_words(app, admin):
    job_id = make_job(app, state=JobState.FAILED, created_at=WHEN, started_at=WHEN,
                      finished_at=WHEN + timedelta(milliseconds=250), rows_done=500, bytes=10,
                      checkpoint={"last_key": [1234], "rows": 500, "bytes": 10,
                                  "sha256": "ab", "part": "7-1.csv.part",
                                  "complete": False})
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        db.session.add(JobAttempt(job=job, number=1, worker="w", outcome="failed",
                                  started_at=WHEN, finished_at=WHEN + timedelta(seconds=0.2)))
        db.session.add(AdminAction(user_id=find_user("admin@exportdesk.test").id, at=WHEN,
                                   action="retry_from_scratch", job_id=job_id,
                                   detail="failed -> queued"))
        db.session.commit()
    page = admin.get(f"/admin/jobs/{job_id}").text
    facts = re.search(r'<dl class="facts" id="job-facts">.*?</dl>\s*</dd>.*?</dl>', page,
                      re.S).group(0)
    assert f'title="{EXACT}">{EXACT}</time>' in facts
    assert not re.search(r"\d\d:\d\d:\d\d\.\d", page), "no microseconds anywhere"
    checkpoint = re.search(r'<dl class="facts checkpoint" id="checkpoint">(.*?)</dl>', page,
                           re.S).group(1)
    assert re.findall(r"<dt>([^<]+)</dt><dd>([^<]+)</dd>", checkpoint) == [
        ("Rows", "500"), ("Bytes", "10"), ("Last key", "1234"), ("Complete", "no"),
        ("Part", "7-1.csv.part")]
    assert '"last_key"' not in page and "{&#34;" not in page, "no raw JSON"
    assert re.search(r'id="job-took">under 1 s<', page)
    assert '<td data-label="Took">under 1 s</td>' in page  # the attempt
    audit = re.search(r'<table class="jobs labelled" id="audit">.*?</table>', page, re.S).group(0)
    assert "retried from scratch" in audit and "retry_from_scratch" not in audit
    assert EXACT in audit


def test_an_email_page_shows_its_message(app, admin):
    with app.app_context():
        email = OutboundEmail(key=secrets.token_hex(8), kind="export_ready",
                              to_address="alice@acme.test", subject="Your export is ready",
                              text_body="Hello Alice,\n\nYour export <#7> is ready.",
                              html_body="<p>Hello</p>", message_id="<x@test>",
                              created_at=WHEN)
        db.session.add(email)
        db.session.commit()
        email_id = email.id
    page = admin.get(f"/admin/emails/{email_id}").text
    message = re.search(r'<div class="card" id="email-message">.*?</div>', page, re.S).group(0)
    assert "<dd>alice@acme.test</dd>" in message and "<dd>Your export is ready</dd>" in message
    assert ('<pre class="mail-text" id="email-text">Hello Alice,\n\nYour export &lt;#7&gt; '
            "is ready.</pre>") in message
    assert f"{EXACT}</time>" in page



def test_a_users_pages_say_times_as_the_admin_pages_do(app):
    """My exports: how long ago, the exact time on hover; the job page: the exact time."""
    from conftest import login

    job_id = make_job(app, state=JobState.QUEUED, created_at=WHEN)
    alice = login(app.test_client(), "alice@acme.test")
    mine = alice.get("/exports").text
    row = re.search(rf'<tr id="row-{job_id}".*?</tr>', mine, re.S)
    tag = f'<time datetime="2026-12-02T13:04:05Z" title="{EXACT}">'
    assert row and re.search(rf"{re.escape(tag)}[^<]+ ago</time>", row.group(0)), mine
    page = alice.get(f"/exports/{job_id}").text
    assert f"{tag}{EXACT}</time>" in page
