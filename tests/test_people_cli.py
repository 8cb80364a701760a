"""`flask org`, `flask user` and `flask token` run for real, as subprocesses on a private
instance: what they change is seen at once by a logged-in session and a bearer token, a
person's mistakes are one line, and a missing or unmigrated database is one line that leaves
nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import (
    ROOT,
    TEST_DATABASE_URL,
    create_database,
    csrf_from,
    drop_database,
    login,
    run_inline,
)
from sqlalchemy import make_url, select

from jobs.models import ApiToken, ExportJob, db, utcnow
from webapp.auth import find_user


@pytest.fixture
def app(fresh):
    return fresh.app


@pytest.fixture
def env(fresh) -> dict:
    return fresh.env


def flask(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # A session of its own: no terminal, so a hidden prompt reads stdin.
    return subprocess.run([sys.executable, "-m", "flask", *args], cwd=ROOT, env=env, text=True,
                          input=stdin, capture_output=True, timeout=120, start_new_session=True)


def ok(env: dict, *args: str, stdin: str | None = None) -> str:
    done = flask(env, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(env: dict, *args: str, stdin: str | None = None) -> str:
    """The one line a refused command says (on stderr, with a non-zero exit)."""
    done = flask(env, *args, stdin=stdin)
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# A missing or unmigrated database

EVERY_COMMAND = [
    ("org", "create", "Initech", "--key", "INI-1"),
    ("org", "list"),
    ("org", "set-key", "acme", "ACME-1"),
    ("user", "create", "new@acme.test", "--org", "acme", "--role", "user"),
    ("user", "create", "new@acme.test", "--org", "acme", "--role", "admin",
     "--password-prompt"),
    ("user", "list"),
    ("user", "list", "--org", "acme"),
    ("user", "set-role", "alice@acme.test", "admin"),
    ("user", "disable", "alice@acme.test"),
    ("user", "enable", "alice@acme.test"),
    ("user", "move", "alice@acme.test", "globex"),
    ("token", "create", "alice@acme.test"),
    ("token", "list", "alice@acme.test"),
    ("token", "revoke", "1"),
]


def everything_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def nowhere_env(tmp_path: Path, database_url: str | None) -> dict:
    """An environment whose INSTANCE_PATH does not exist, on `database_url` (None: the
    instance folder's SQLite file)."""
    env = {**os.environ, "FLASK_APP": "webapp", "INSTANCE_PATH": str(tmp_path / "nowhere")}
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def test_every_command_on_a_missing_database_says_so_in_one_line_and_creates_nothing(
        tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()  # a fresh empty SQLite file
    cases = [(None, "no database at", EVERY_COMMAND),
             (f"sqlite:///{empty}", "is not migrated", EVERY_COMMAND)]
    if TEST_DATABASE_URL:  # the same check, on a server: a few commands are enough
        unmigrated = create_database(TEST_DATABASE_URL)
        missing = make_url(TEST_DATABASE_URL).set(database="exportdesk_no_such_database")
        cases += [(unmigrated, "is not migrated", EVERY_COMMAND[::4]),
                  (missing.render_as_string(hide_password=False), "does not exist",
                   EVERY_COMMAND[::4])]
    try:
        before = everything_under(tmp_path)
        for database_url, says, commands in cases:
            env = nowhere_env(tmp_path, database_url)
            with ThreadPoolExecutor(4) as pool:  # they create nothing, so they may overlap
                lines = pool.map(lambda c, env=env: refused(env, *c, stdin="password1\n" * 2),
                                 commands)
                for command, line in zip(commands, lines, strict=True):
                    assert says in line, (command, line)
                    assert "flask db upgrade" in line, line
                    assert f"INSTANCE_PATH={tmp_path / 'nowhere'}" in line, line
            assert everything_under(tmp_path) == before, database_url
        assert empty.stat().st_size == 0
    finally:
        if TEST_DATABASE_URL:
            drop_database(TEST_DATABASE_URL, unmigrated)


def test_a_database_behind_the_code_is_named_with_its_revision(env):
    ok(env, "db", "downgrade")
    line = refused(env, "user", "list")
    assert re.search(r"is at revision \w+, not \w+: run `flask db upgrade`", line), line
    ok(env, "db", "upgrade")
    assert "alice@acme.test" in ok(env, "user", "list")


# Organisations


def test_org_create_list_and_set_key(env):
    out = ok(env, "org", "create", "Initech Café, Ltd.", "--key", "INI-1")
    assert "slug initech-cafe-ltd" in out and "key INI-1" in out
    ok(env, "user", "create", "peter@initech.test", "--org", "INI-1", "--role", "user")
    listing = ok(env, "org", "list").splitlines()
    assert listing[0].split() == ["id", "slug", "name", "key", "users"]
    initech = next(line for line in listing if "initech-cafe-ltd" in line)
    assert initech.split()[-2:] == ["INI-1", "1"]
    assert ok(env, "org", "set-key", "initech-cafe-ltd", "INI-2").strip() == \
        "initech-cafe-ltd: INI-2"
    assert "INI-2" in ok(env, "org", "list")


def test_org_mistakes_are_one_line(env):
    ok(env, "org", "create", "Initech", "--key", "INI-1")
    assert "exists already" in refused(env, "org", "create", "Initech", "--key", "INI-9")
    assert "exists already" in refused(env, "org", "create", "initech!", "--key", "INI-9")
    assert "has the key 'INI-1' already" in refused(env, "org", "create", "Hooli", "--key",
                                                    "INI-1")
    assert "no organisation" in refused(env, "org", "set-key", "hooli", "H-1")
    assert "has the key 'INI-1' already" in refused(env, "org", "set-key", "acme", "INI-1")
    assert "Missing option '--key'" in flask(env, "org", "create", "Hooli").stderr


# Users


def test_invitation_link_sets_the_password_once(app, env):
    out = ok(env, "user", "create", "Newcomer@Acme.test", "--org", "acme", "--role", "user")
    assert "Created newcomer@acme.test (user) in Acme (acme)." in out
    [link] = re.findall(r"http\S+/invitation/\S+", out)
    assert "invited" in ok(env, "user", "list", "--org", "acme")
    client = app.test_client()
    no_password_yet = client.post("/login", data={
        "email": "newcomer@acme.test", "password": "!",
        "csrf_token": csrf_from(client.get("/login").get_data(as_text=True))})
    assert "Wrong email or password" in no_password_yet.get_data(as_text=True)
    path = urlsplit(link).path
    page = client.get(path)
    assert page.status_code == 200 and "choose your password" in page.get_data(as_text=True)
    form = {"password": "a new secret", "confirm": "a new secret",
            "csrf_token": csrf_from(page.get_data(as_text=True))}
    done = client.post(path, data=form)
    assert done.status_code == 303 and done.headers["Location"].endswith("/login")
    login(app.test_client(), "newcomer@acme.test", "a new secret")
    assert "active" in ok(env, "user", "list", "--org", "acme")
    again = client.post(path, data={**form, "password": "another one", "confirm": "another one"})
    assert again.status_code == 400 and "cannot be used" in again.get_data(as_text=True)
    assert client.get(path).status_code == 400
    login(app.test_client(), "newcomer@acme.test", "a new secret")


def test_password_prompt_asks_twice(app, env):
    out = ok(env, "user", "create", "boss@acme.test", "--org", "acme", "--role", "admin",
             "--password-prompt", stdin="first real admin\nfirst real admin\n")
    assert "Created boss@acme.test (admin)" in out and "invitation" not in out.lower()
    admin = login(app.test_client(), "boss@acme.test", "first real admin")
    assert admin.get("/admin/jobs").status_code == 200
    mismatch = flask(env, "user", "create", "other@acme.test", "--org", "acme", "--role",
                     "user", "--password-prompt", stdin="first secret\nsecond secret\n")
    assert mismatch.returncode != 0 and "do not match" in mismatch.stdout + mismatch.stderr
    assert "other@acme.test" not in ok(env, "user", "list")


def test_user_mistakes_are_one_line(env):
    create = ("user", "create", "new@acme.test", "--org", "acme", "--role")
    mistakes = {
        (*create[:4], "nope", "--role", "user"): "no organisation with slug or key 'nope'",
        (*create, "king"): "unknown role 'king': choose user, viewer, admin",
        ("user", "create", "new", "--org", "acme", "--role", "user"): "not an email address",
        ("user", "create", "Alice@acme.test", "--org", "acme", "--role", "user"):
            "a user 'alice@acme.test' exists already",
        ("user", "set-role", "nobody@acme.test", "admin"): "no user 'nobody@acme.test'",
        ("user", "set-role", "alice@acme.test", "root"): "unknown role 'root'",
        ("user", "disable", "nobody@acme.test"): "no user 'nobody@acme.test'",
        ("user", "enable", "nobody@acme.test"): "no user 'nobody@acme.test'",
        ("user", "list", "--org", "nope"): "no organisation",
        ("token", "create", "nobody@acme.test"): "no user",
        ("token", "list", "nobody@acme.test"): "no user",
        ("token", "revoke", "999999"): "no API token with id '999999'",
        ("token", "revoke", "x"): "no API token with id 'x'",
    }
    with ThreadPoolExecutor(4) as pool:  # each is refused: nothing changes
        lines = pool.map(lambda command: refused(env, *command), mistakes)
        for (command, says), line in zip(mistakes.items(), lines, strict=True):
            assert line == f"Error: {says}" or line.startswith(f"Error: {says}"), (command, line)
    assert "new@acme.test" not in ok(env, "user", "list")


def test_set_role_takes_effect_at_once(app, env):
    alice = login(app.test_client(), "alice@acme.test")
    assert alice.get("/admin/jobs").status_code == 403
    assert ok(env, "user", "set-role", "alice@acme.test", "admin").strip() == \
        "alice@acme.test: admin (was user)"
    assert alice.get("/admin/jobs").status_code == 200
    ok(env, "user", "set-role", "alice@acme.test", "viewer")
    assert alice.get("/admin/jobs").status_code == 200
    ok(env, "user", "set-role", "alice@acme.test", "user")
    assert alice.get("/admin/jobs").status_code == 403


def test_disable_stops_session_and_tokens_on_the_next_request_and_enable_restores(app, env):
    alice = login(app.test_client(), "alice@acme.test")
    token = ok(env, "token", "create", "alice@acme.test").strip()
    api = app.test_client()
    with app.app_context():
        jobs = db.session.scalars(select(ExportJob.id).where(
            ExportJob.user_id == find_user("alice@acme.test").id)).all()
    assert alice.get("/exports").status_code == 200
    assert api.get("/api/jobs", headers=bearer(token)).status_code == 200

    assert "disabled since" in ok(env, "user", "disable", "alice@acme.test")
    response = alice.get("/exports")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert api.get("/api/jobs", headers=bearer(token)).status_code == 401
    fresh_client = app.test_client()
    page = fresh_client.get("/login").get_data(as_text=True)
    refused_login = fresh_client.post("/login", data={
        "email": "alice@acme.test", "password": "exportdesk", "csrf_token": csrf_from(page)})
    assert refused_login.status_code == 400
    assert "This account is disabled" in refused_login.get_data(as_text=True)
    assert "is disabled" in refused(env, "token", "create", "alice@acme.test")
    assert "disabled since" in ok(env, "user", "list", "--org", "acme")
    with app.app_context():
        assert db.session.scalars(select(ExportJob.id).where(
            ExportJob.user_id == find_user("alice@acme.test").id)).all() == jobs

    assert ok(env, "user", "enable", "alice@acme.test").strip() == "alice@acme.test: enabled"
    # The sessions that disabling ended stay ended: they log in again; tokens work again.
    assert login(app.test_client(), "alice@acme.test").get("/exports").status_code == 200
    assert api.get("/api/jobs", headers=bearer(token)).status_code == 200


def test_disabling_also_ends_emailed_download_links(app, env):
    from webapp.tokens import download_token

    job = run_inline(app, "alice@acme.test", "orders")
    with app.app_context():
        link = f"/d/{download_token(db.session.get(ExportJob, job.id))}"
    client = app.test_client()
    assert client.get(link).status_code == 200
    ok(env, "user", "disable", "alice@acme.test")
    assert client.get(link).status_code == 403
    ok(env, "user", "enable", "alice@acme.test")
    assert client.get(link).status_code == 200


def test_move_and_the_rules_from_the_command_line_are_those_of_the_admin_pages(app, env):
    from jobs.models import AdminAction

    assert ok(env, "user", "move", "alice@acme.test", "globex").strip() == \
        "alice@acme.test: now in Globex (globex)"
    assert "globex" in next(line for line in ok(env, "user", "list").splitlines()
                            if "alice@acme.test" in line)
    assert refused(env, "user", "move", "alice@acme.test", "globex") == \
        "Error: alice@acme.test is in Globex already"
    assert "no organisation" in refused(env, "user", "move", "alice@acme.test", "nope")
    assert refused(env, "user", "set-role", "admin@exportdesk.test", "user").startswith(
        "Error: admin@exportdesk.test is the last active admin")
    assert "last active admin" in refused(env, "user", "disable", "admin@exportdesk.test")
    with app.app_context():  # the command line names nobody: it writes no audit row
        assert db.session.scalar(select(AdminAction.id)) is None


# Tokens


def test_token_list_last_used_and_revoke(app, env):
    named = ok(env, "token", "create", "bob@globex.test", "--name", "nightly report").strip()
    plain = ok(env, "token", "create", "bob@globex.test").strip()
    lines = ok(env, "token", "list", "bob@globex.test").splitlines()
    assert lines[0].split() == ["id", "name", "created", "last", "used"]
    assert "nightly report" in lines[1] and lines[1].endswith("never")
    assert len(lines) == 3 and lines[2].endswith("never")
    named_id = int(lines[1].split()[0])

    client = app.test_client()
    assert client.get("/api/jobs", headers=bearer(named)).status_code == 200
    with app.app_context():
        first = db.session.get(ApiToken, named_id).last_used_at
    assert first is not None
    assert client.get("/api/jobs", headers=bearer(named)).status_code == 200
    with app.app_context():
        assert db.session.get(ApiToken, named_id).last_used_at == first, "one write a minute"
        db.session.get(ApiToken, named_id).last_used_at = utcnow() - timedelta(minutes=2)
        db.session.commit()
    assert client.get("/api/jobs", headers=bearer(named)).status_code == 200
    with app.app_context():
        assert db.session.get(ApiToken, named_id).last_used_at >= first
    assert "never" not in ok(env, "token", "list", "bob@globex.test").splitlines()[1]

    assert ok(env, "token", "revoke", str(named_id)).strip() == \
        f"Revoked token {named_id} of bob@globex.test."
    assert client.get("/api/jobs", headers=bearer(named)).status_code == 401
    assert client.get("/api/jobs", headers=bearer(plain)).status_code == 200
    assert "nightly report" not in ok(env, "token", "list", "bob@globex.test")
    assert "no API token" in refused(env, "token", "revoke", str(named_id))
