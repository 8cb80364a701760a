"""Messages people read: the format field's error, refusals by state, and HTTP errors in our
own words (JSON `{"error": ...}` under /api)."""

from __future__ import annotations

import pytest
from conftest import csrf_from

from jobs import dispatch
from jobs.models import EmailState, ExportJob, JobState, db
from webapp.auth import find_user


def api_post(client, path: str, json: dict | None = None):
    token = csrf_from(client.get("/").get_data(as_text=True))
    return client.post(path, json=json, headers={"X-CSRFToken": token})


def test_an_unknown_format_is_a_sentence_in_the_form_and_the_api(alice):
    response = api_post(alice, "/api/exports", {"dataset": "transactions", "format": "exe"})
    assert response.status_code == 400
    assert response.json["fields"]["format"] == "must be one of csv, csv.gz, xlsx."
    token = csrf_from(alice.get("/").get_data(as_text=True))
    page = alice.post("/exports", data={"dataset": "transactions", "format": "exe",
                                        "csrf_token": token}).get_data(as_text=True)
    assert "Format must be one of csv, csv.gz, xlsx." in page
    assert "unknown format" not in page


@pytest.mark.parametrize("state, words", [
    (JobState.SUCCEEDED, "has already succeeded"),
    (JobState.FAILED, "has already failed"),
    (JobState.CANCELLED, "has already been cancelled"),
    (JobState.EXPIRED, "has expired"),
])
def test_cancel_refused_says_what_happened(app, alice, state, words):
    with app.app_context():
        user = find_user("alice@acme.test")
        job = ExportJob(user=user, org_id=user.org_id, dataset="transactions", params={},
                        state=state)
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    response = api_post(alice, f"/api/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json["error"] == (f"Export #{job_id} {words}: only queued or running "
                                      "exports can be cancelled.")


def test_every_state_reads_as_words():
    states = [v for k, v in vars(JobState).items() if k.isupper() and isinstance(v, str)]
    states += [v for k, v in vars(EmailState).items() if k.isupper() and isinstance(v, str)]
    for state in states:
        assert state in dispatch.STATE_WORDS, state
        assert dispatch._is(state) != f"is {state}" or state == "running", state


@pytest.mark.parametrize("method, path, status, message", [
    ("get", "/api/no-such-thing", 404,
     "There is nothing at this address: it may be mistyped, or what it showed is gone."),
    ("get", "/api/jobs/999999999", 404,
     "There is nothing at this address: it may be mistyped, or what it showed is gone."),
    ("get", "/api/exports", 405, "GET is not allowed at this address; use POST."),
    ("delete", "/api/jobs", 405, "DELETE is not allowed at this address; use GET."),
    ("get", "/api/lanes", 403, "Lane health is for admins and viewers."),  # the view's own
])
def test_api_errors_are_our_json_in_our_words(alice, method, path, status, message):
    token = csrf_from(alice.get("/").get_data(as_text=True))
    response = alice.open(path, method=method.upper(), headers={"X-CSRFToken": token})
    assert response.status_code == status
    assert response.is_json and response.json == {"error": message}


def test_pages_errors_are_in_our_words_too(alice):
    response = alice.get("/no-such-page")
    assert response.status_code == 404
    text = response.get_data(as_text=True)
    assert "There is nothing at this address" in text and "spelling" not in text
