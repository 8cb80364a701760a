"""/admin/people through the test client: invitations by email (a real SMTP server, the
critical lane's task), roles and disabling that count on the next request, viewers who only
look, the last-admin guard, the audit log, and each organisation's data staying its own when
a person moves."""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from conftest import csrf_from, login, run_inline
from mailserver import links_in, text_of
from sqlalchemy import func, select

from jobs import engine
from jobs.models import AdminAction, ExportJob, Organisation, OutboundEmail, User, db
from webapp import people_ops as ops
from webapp.auth import create_token, find_user
from webapp.tokens import download_token


# Each test changes people: every test gets a database of its own (conftest.fresh).
@pytest.fixture
def app(fresh):
    return fresh.app


@pytest.fixture
def admin(app):
    return login(app.test_client(), "admin@exportdesk.test")


@pytest.fixture
def viewer(app):
    return login(app.test_client(), "viewer@exportdesk.test")


@pytest.fixture
def alice(app):
    return login(app.test_client(), "alice@acme.test")


def post(client, path: str, headers: dict | None = None, **data):
    token = csrf_from(client.get("/").get_data(as_text=True))
    return client.post(path, data={"csrf_token": token, **data}, headers=headers or {})


def org_id(app, slug: str) -> int:
    with app.app_context():
        return db.session.scalar(select(Organisation.id).where(Organisation.slug == slug))


def user_id(app, email: str) -> int:
    with app.app_context():
        return find_user(email).id


def token_for(app, email: str) -> dict:
    with app.app_context():
        return {"Authorization": f"Bearer {create_token(find_user(email))}"}


def log_of(app) -> list[tuple]:
    """The audit log of people actions, oldest first: (who, action, on whom, org, detail)."""
    with app.app_context():
        rows = db.session.scalars(select(AdminAction).where(
            AdminAction.subject_user_id.is_not(None) | AdminAction.org_id.is_not(None))
            .order_by(AdminAction.id))
        return [(a.user.email, a.action, a.subject_user.email if a.subject_user else None,
                 db.session.get(Organisation, a.org_id).slug if a.org_id else None, a.detail)
                for a in rows]


def invite(admin, app, email: str, org: str = "acme", role: str = "user"):
    return post(admin, "/admin/people/invite", email=email, org=str(org_id(app, org)),
                role=role)


def text(response) -> str:
    return response.get_data(as_text=True)


# Invitations


def test_invite_email_set_password_log_in_and_the_link_works_once(app, admin, sending):
    response = invite(admin, app, "  Carol@Acme.test ")
    assert response.status_code == 303
    carol = user_id(app, "carol@acme.test")
    assert response.headers["Location"] == f"/admin/people/users/{carol}"
    page = text(admin.get(response.headers["Location"]))
    assert "Invitation sent to carol@acme.test (user in Acme)" in page
    assert 'id="user-state">invited<' in page

    message = sending.wait_for(lambda m: m["To"] == "carol@acme.test")
    assert message["Subject"] == "You are invited to exportdesk (Acme)"
    assert "admin@exportdesk.test invited you to exportdesk, in Acme, as a user" in \
        text_of(message)
    [link] = [link for link in links_in(message) if "/invitation/" in link]
    assert link.startswith("http://127.0.0.1:5000/invitation/"), "BASE_URL, never the Host"
    with app.app_context():
        sent = db.session.scalar(select(OutboundEmail).where(
            OutboundEmail.kind == "invitation", OutboundEmail.to_address == "carol@acme.test"))
        assert (sent.state, sent.attempts) == ("sent", 1)
    assert f"Email {sent.id}" in text(admin.get(f"/admin/people/users/{carol}"))

    newcomer = app.test_client()
    path = urlsplit(link).path
    form = newcomer.get(path)
    assert form.status_code == 200 and "Welcome: choose your password" in text(form)
    done = newcomer.post(path, data={"password": "my first pw", "confirm": "my first pw",
                                     "csrf_token": csrf_from(text(form))})
    assert done.status_code == 303 and done.headers["Location"] == "/login"
    login(app.test_client(), "carol@acme.test", "my first pw")
    assert 'id="user-state">active<' in text(admin.get(f"/admin/people/users/{carol}"))

    again = newcomer.get(path)
    assert again.status_code == 400 and "cannot be used" in text(again), "single use"
    assert log_of(app) == [("admin@exportdesk.test", "user.invite", "carol@acme.test", "acme",
                            "user in Acme")]


def test_an_expired_invitation_says_so(app, admin, sending, monkeypatch):
    invite(admin, app, "dave@acme.test", role="viewer")
    message = sending.wait_for(lambda m: m["To"] == "dave@acme.test")
    assert "as a viewer" in text_of(message)
    [link] = [link for link in links_in(message) if "/invitation/" in link]
    monkeypatch.setitem(app.config, "INVITATION_TTL", timedelta(seconds=-1))
    response = app.test_client().get(urlsplit(link).path)
    assert response.status_code == 410 and "expired" in text(response)


@pytest.mark.parametrize("fields, says", [
    ({"email": "Alice@acme.test"}, "A user &#39;alice@acme.test&#39; exists already"),
    ({"email": "not-an-address"}, "Not an email address"),
    ({"org": ""}, "Choose an organisation"),
    ({"org": "999999"}, "Choose an organisation"),
    ({"org": "9" * 30}, "Choose an organisation"),
    ({"role": "king"}, "Unknown role &#39;king&#39;"),
])
def test_invite_mistakes_are_form_errors_and_change_nothing(app, admin, fields, says):
    data = {"email": "erin@acme.test", "org": str(org_id(app, "acme")), "role": "user",
            **fields}
    response = post(admin, "/admin/people/invite", **data)
    assert response.status_code == 400
    page = text(response)
    assert says in page and 'aria-invalid="true"' in page
    assert f'value="{data["email"]}"' in page, "what was typed stays in the form"
    with app.app_context():
        assert db.session.scalar(select(func.count(User.id))) == 4
        assert db.session.scalar(select(func.count(OutboundEmail.id))) == 0
    assert log_of(app) == []


# Organisations


def test_create_organisation_and_its_mistakes(app, admin):
    response = post(admin, "/admin/people/orgs", name="Initech Café", key="INI-1")
    assert response.status_code == 303
    page = text(admin.get("/admin/people/"))
    assert "Organisation Initech Café created (slug initech-cafe, data key INI-1)" in page
    assert re.search(r'<tr id="org-initech-cafe"><td data-label="Name">Initech Café</td>'
                     r'<td data-label="Slug">initech-cafe</td>'
                     r'<td data-label="Data key"><code>INI-1</code>', page)
    for fields, says in [({"name": "initech cafe!", "key": "X"}, "exists already"),
                         ({"name": "Hooli", "key": "INI-1"}, "has the key &#39;INI-1&#39;"),
                         ({"name": "", "key": "H"}, "The name must be"),
                         ({"name": "Hooli", "key": " "}, "The key must be")]:
        refused = post(admin, "/admin/people/orgs", **fields)
        assert refused.status_code == 400 and says in text(refused), fields
    assert log_of(app) == [("admin@exportdesk.test", "org.create", None, "initech-cafe",
                            "Initech Café (slug initech-cafe, key INI-1)")]
    # the new organisation is offered at once, and filters the users
    assert f'<option value="{org_id(app, "initech-cafe")}"' in page
    assert "No users." in text(admin.get("/admin/people/?org=initech-cafe"))
    acme = text(admin.get("/admin/people/?org=acme"))
    assert "alice@acme.test" in acme and "bob@globex.test" not in acme


# Roles, disabling


def test_a_role_change_counts_on_the_next_request(app, admin, alice):
    alice_id = user_id(app, "alice@acme.test")
    assert alice.get("/admin/people/").status_code == 403
    assert post(admin, f"/admin/people/users/{alice_id}/role", role="admin").status_code == 303
    assert alice.get("/admin/people/").status_code == 200
    assert alice.get("/admin/jobs").status_code == 200
    assert post(admin, f"/admin/people/users/{alice_id}/role", role="viewer").status_code == 303
    assert alice.get("/admin/people/").status_code == 200
    assert post(alice, "/admin/people/orgs", name="X", key="X").status_code == 403
    assert post(admin, f"/admin/people/users/{alice_id}/role", role="user").status_code == 303
    assert alice.get("/admin/jobs").status_code == 403
    assert [row[1:] for row in log_of(app)] == [
        ("user.role", "alice@acme.test", "acme", "user → admin"),
        ("user.role", "alice@acme.test", "acme", "admin → viewer"),
        ("user.role", "alice@acme.test", "acme", "viewer → user")]


def test_disable_stops_a_session_and_a_token_at_once_and_enable_lets_them_back(app, admin,
                                                                                alice):
    alice_id = user_id(app, "alice@acme.test")
    bearer = token_for(app, "alice@acme.test")
    api = app.test_client()
    assert alice.get("/exports").status_code == 200
    assert api.get("/api/jobs", headers=bearer).status_code == 200

    confirm = admin.get(f"/admin/people/users/{alice_id}/disable")  # the no-JavaScript path
    assert confirm.status_code == 200 and "Disable alice@acme.test?" in text(confirm)
    done = admin.post(f"/admin/people/users/{alice_id}/disable",
                      data={"csrf_token": csrf_from(text(confirm))})
    assert done.status_code == 303
    assert "alice@acme.test is disabled" in text(admin.get(done.headers["Location"]))
    response = alice.get("/exports")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert api.get("/api/jobs", headers=bearer).status_code == 401
    again = app.test_client()
    refused = again.post("/login", data={"email": "alice@acme.test", "password": "exportdesk",
                                         "csrf_token": csrf_from(text(again.get("/login")))})
    assert refused.status_code == 400 and "This account is disabled" in text(refused)

    assert post(admin, f"/admin/people/users/{alice_id}/enable").status_code == 303
    assert api.get("/api/jobs", headers=bearer).status_code == 200
    assert login(app.test_client(), "alice@acme.test").get("/exports").status_code == 200
    assert [row[1] for row in log_of(app)] == ["user.disable", "user.enable"]


def test_disable_from_the_dialog_answers_htmx_with_a_redirect(app, admin):
    bob_id = user_id(app, "bob@globex.test")
    page = text(admin.get(f"/admin/people/users/{bob_id}"))
    assert f'hx-post="/admin/people/users/{bob_id}/disable"' in page and "hx-confirm=" in page
    response = post(admin, f"/admin/people/users/{bob_id}/disable",
                    headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert response.headers["HX-Redirect"] == f"/admin/people/users/{bob_id}"
    assert 'id="user-state">disabled<' in text(admin.get(f"/admin/people/users/{bob_id}"))


def alices_job(app) -> int:
    """A queued export of Alice's, as the form makes one."""
    with app.app_context():
        alice = find_user("alice@acme.test")
        job = ExportJob(user=alice, org_id=alice.org_id, dataset="orders", params={})
        db.session.add(job)
        db.session.commit()
        return job.id


def test_a_disabled_users_running_export_goes_on_and_admins_still_reach_the_file(app, admin):
    job_id = alices_job(app)
    post(admin, f"/admin/people/users/{user_id(app, 'alice@acme.test')}/disable")
    with app.app_context():
        engine.run(job_id, max_attempts=1)  # what a worker does with it
        assert db.session.get(ExportJob, job_id).state == "succeeded"
    assert admin.get(f"/exports/{job_id}/download").status_code == 200
    assert admin.get(f"/admin/jobs/{job_id}").status_code == 200
    assert "their files stay reachable here" in text(
        admin.get(f"/admin/people/users/{user_id(app, 'alice@acme.test')}"))


# Who may do what


def test_viewers_read_only_users_403_and_csrf(app, admin, viewer, alice):
    alice_id = user_id(app, "alice@acme.test")
    for path in ("/admin/people/", f"/admin/people/users/{alice_id}"):
        page = viewer.get(path)
        assert page.status_code == 200, path
        assert "<select id=\"role\"" not in text(page) and "invite-form" not in text(page)
        assert "org-form" not in text(page) and "read-only" in text(page)
        assert alice.get(path).status_code == 403, path
    assert 'id="invite-form"' in text(admin.get("/admin/people/"))
    posts = [("/admin/people/orgs", {"name": "Hooli", "key": "H"}),
             ("/admin/people/invite", {"email": "x@acme.test", "org": "1", "role": "user"}),
             (f"/admin/people/users/{alice_id}/role", {"role": "admin"}),
             (f"/admin/people/users/{alice_id}/disable", {}),
             (f"/admin/people/users/{alice_id}/enable", {}),
             (f"/admin/people/users/{alice_id}/move", {"org": str(org_id(app, "globex"))})]
    for path, data in posts:
        assert post(viewer, path, **data).status_code == 403, path
        assert post(alice, path, **data).status_code == 403, path
        assert admin.post(path, data=data).status_code == 400, f"{path} without CSRF"
    assert viewer.get(f"/admin/people/users/{alice_id}/disable").status_code == 403
    with app.app_context():
        alice = find_user("alice@acme.test")
        assert (alice.role, alice.is_active, alice.organisation.slug) == ("user", True, "acme")
        assert find_user("x@acme.test") is None
    assert log_of(app) == []


def test_the_last_active_admin_cannot_demote_or_disable_themselves(app, admin):
    me = user_id(app, "admin@exportdesk.test")
    refused = post(admin, f"/admin/people/users/{me}/role", role="viewer")
    assert refused.status_code == 409
    assert "admin@exportdesk.test is the last active admin" in text(refused)
    refused = post(admin, f"/admin/people/users/{me}/disable")
    assert refused.status_code == 409 and "You cannot disable your own account" in text(refused)
    assert "This is your own account" in text(admin.get(f"/admin/people/users/{me}"))
    assert admin.get("/admin/people/").status_code == 200  # still an admin

    post(admin, f"/admin/people/users/{user_id(app, 'alice@acme.test')}/role", role="admin")
    assert post(admin, f"/admin/people/users/{me}/role", role="user").status_code == 303
    assert admin.get("/admin/people/").status_code == 403, "demoted: at once"
    assert [row[1:3] for row in log_of(app)] == [("user.role", "alice@acme.test"),
                                                ("user.role", "admin@exportdesk.test")]


def test_the_audit_log_shows_each_action_with_who_and_when(app, admin, sending):
    post(admin, "/admin/people/orgs", name="Initech", key="INI-1")
    invite(admin, app, "peter@initech.test", org="initech", role="viewer")
    peter = user_id(app, "peter@initech.test")
    for path, data in [("role", {"role": "user"}), ("move", {"org": org_id(app, "acme")}),
                       ("disable", {}), ("enable", {})]:
        assert post(admin, f"/admin/people/users/{peter}/{path}", **data).status_code == 303
    assert log_of(app) == [
        ("admin@exportdesk.test", "org.create", None, "initech",
         "Initech (slug initech, key INI-1)"),
        ("admin@exportdesk.test", "user.invite", "peter@initech.test", "initech",
         "viewer in Initech"),
        ("admin@exportdesk.test", "user.role", "peter@initech.test", "initech",
         "viewer → user"),
        ("admin@exportdesk.test", "user.move", "peter@initech.test", "acme",
         "Initech → Acme"),
        ("admin@exportdesk.test", "user.disable", "peter@initech.test", "acme",
         "0 session(s) ended"),
        ("admin@exportdesk.test", "user.enable", "peter@initech.test", "acme", ""),
    ]
    page = text(admin.get("/admin/people/"))
    rows = re.findall(r'<tr><td data-label="When"><time datetime="[^"]+" title="[^"]+">'
                      r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC)</time></td>"
                      r'<td data-label="Who">([^<]+)</td><td data-label="Action">([^<]+)</td>',
                      page)
    assert [r[2] for r in rows] == ["enabled", "disabled", "moved to another organisation",
                                    "changed the role", "invited",
                                    "created the organisation"], "newest first, in words"
    assert {r[1] for r in rows} == {"admin@exportdesk.test"}
    person = text(admin.get(f"/admin/people/users/{peter}"))
    assert person.count("peter@initech.test</a></td>") == 5, "their page: their actions"
    assert "Initech → Acme" in person


# An organisation's data stays its own


def test_a_moved_user_no_longer_reaches_the_old_organisations_jobs(app, admin):
    job = run_inline(app, "alice@acme.test", "orders")
    assert job.state == "succeeded"
    with app.app_context():
        link = f"/d/{download_token(db.session.get(ExportJob, job.id))}"
    bearer = token_for(app, "alice@acme.test")
    api = app.test_client()

    def reaches(client) -> dict[str, int]:
        listed = client.get("/api/jobs", headers=bearer).get_json()["jobs"]
        return {
            "page": client.get(f"/exports/{job.id}").status_code,
            "list": int(f"/exports/{job.id}\"" in text(client.get("/exports"))),
            "download": client.get(f"/exports/{job.id}/download").status_code,
            "api list": int(job.id in [j["id"] for j in listed]),
            "api job": client.get(f"/api/jobs/{job.id}", headers=bearer).status_code,
            "api retry": client.post(f"/api/jobs/{job.id}/retry",
                                     headers=bearer).status_code,
            "signed link": app.test_client().get(link).status_code,
        }

    before = login(app.test_client(), "alice@acme.test")
    assert reaches(before) == {"page": 200, "list": 1, "download": 200, "api list": 1,
                               "api job": 200, "api retry": 409, "signed link": 200}
    moved = post(admin, f"/admin/people/users/{user_id(app, 'alice@acme.test')}/move",
                 org=str(org_id(app, "globex")))
    assert moved.status_code == 303
    assert "moved to Globex" in text(admin.get(moved.headers["Location"]))
    after = login(app.test_client(), "alice@acme.test")
    assert reaches(after) == {"page": 404, "list": 0, "download": 404, "api list": 0,
                              "api job": 404, "api retry": 404, "signed link": 403}
    assert "moved to another organisation" in text(app.test_client().get(link))
    assert admin.get(f"/exports/{job.id}/download").status_code == 200, "admins still do"
    # the same Idempotency-Key after the move is a new job, in the new organisation
    body = {"dataset": "orders", "format": "csv"}
    key = {"Idempotency-Key": "nightly", **bearer}
    new = api.post("/api/exports", json=body, headers=key)
    assert new.status_code == 202 and new.get_json()["id"] != job.id
    with app.app_context():
        assert db.session.get(ExportJob, new.get_json()["id"]).org_id == org_id(app, "globex")


def test_the_ready_email_of_an_export_whose_owner_moved_is_not_sent(app, admin):
    job_id = alices_job(app)
    post(admin, f"/admin/people/users/{user_id(app, 'alice@acme.test')}/move",
         org=str(org_id(app, "globex")))
    with app.app_context():
        engine.run(job_id, max_attempts=1)
        assert db.session.get(ExportJob, job_id).state == "succeeded"
        assert db.session.scalar(select(func.count(OutboundEmail.id))
                                 .where(OutboundEmail.job_id == job_id)) == 0


def test_viewers_see_every_organisations_jobs_but_change_nothing(app, viewer):
    job = run_inline(app, "alice@acme.test", "orders")
    bob = login(app.test_client(), "bob@globex.test")
    assert viewer.get(f"/exports/{job.id}").status_code == 200
    assert 'id="retry-' not in text(viewer.get(f"/exports/{job.id}")), "no buttons to press"
    assert viewer.get(f"/exports/{job.id}/download").status_code == 200
    assert viewer.get(f"/api/jobs/{job.id}").status_code == 200
    assert post(viewer, f"/exports/{job.id}/retry").status_code == 403
    assert viewer.get(f"/exports/{job.id}/cancel").status_code == 403
    assert app.test_client().post(f"/api/jobs/{job.id}/retry", headers=token_for(
        app, "viewer@exportdesk.test")).status_code == 403
    for path in (f"/exports/{job.id}", f"/exports/{job.id}/download", f"/api/jobs/{job.id}"):
        assert bob.get(path).status_code == 404, path
    assert post(bob, f"/exports/{job.id}/retry").status_code == 404


def test_two_admins_demoting_each_other_at_once_leave_one_admin(app):
    """The last-admin rule holds under a race: the second demotion waits for the first and
    then sees it (on PostgreSQL and on SQLite)."""
    with app.app_context():
        ops.create_user("second-admin@exportdesk.test", find_user("admin@exportdesk.test")
                        .organisation, "admin", actor=None, password="a long password 1")
        db.session.commit()
    first_changed, first_may_commit, results = threading.Event(), threading.Event(), {}

    def demote(email: str, first: bool) -> None:
        with app.app_context():
            try:
                ops.set_role(find_user(email), "user", actor=None)
                db.session.flush()
                if first:  # holds its transaction open while the other one tries
                    first_changed.set()
                    first_may_commit.wait(30)
                db.session.commit()
                results[email] = "demoted"
            except ops.Refused:
                db.session.rollback()
                results[email] = "refused"

    one = threading.Thread(target=demote, args=("admin@exportdesk.test", True))
    one.start()
    assert first_changed.wait(30)
    other = threading.Thread(target=demote, args=("second-admin@exportdesk.test", False))
    other.start()
    other.join(1)  # it waits on the first one's lock meanwhile (or would demote wrongly)
    first_may_commit.set()
    one.join(30)
    other.join(30)
    assert sorted(results.values()) == ["demoted", "refused"], results
    with app.app_context():
        assert db.session.scalar(select(func.count(User.id)).where(
            User.role == "admin", User.disabled_at.is_(None))) == 1


def test_an_invitation_sent_again_works_and_the_earlier_link_no_longer_does(
        app, admin, sending):
    invite(admin, app, "dave@acme.test")
    dave = user_id(app, "dave@acme.test")
    first = sending.wait_for(lambda m: m["To"] == "dave@acme.test")
    page = text(admin.get(f"/admin/people/users/{dave}"))
    assert 'id="invite-again"' in page
    again = post(admin, f"/admin/people/users/{dave}/invite-again")
    assert again.status_code == 303
    assert "A new invitation is on its way to dave@acme.test" in text(admin.get(
        again.headers["Location"]))
    second = sending.wait_for(lambda m: m["To"] == "dave@acme.test" and m is not first)
    [old], [new] = ([link for link in links_in(m) if "/invitation/" in link]
                    for m in (first, second))
    assert old != new
    newcomer = app.test_client()
    stale = newcomer.get(urlsplit(old).path)
    assert stale.status_code == 400 and "cannot be used" in text(stale)
    form = newcomer.get(urlsplit(new).path)
    assert form.status_code == 200
    done = newcomer.post(urlsplit(new).path, data={
        "password": "dave's pw 1", "confirm": "dave's pw 1", "csrf_token": csrf_from(text(form))})
    assert done.status_code == 303
    login(app.test_client(), "dave@acme.test", "dave's pw 1")

    refused = post(admin, f"/admin/people/users/{dave}/invite-again")  # active now
    assert refused.status_code == 409 and "only an invited user" in text(refused)
    assert 'id="invite-again"' not in text(admin.get(f"/admin/people/users/{dave}"))
    assert [a[1] for a in log_of(app)] == ["user.invite", "user.reinvite"]
