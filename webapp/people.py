"""`flask org`, `flask user` and `flask token`: organisations, people and their API tokens from
the command line, for the first admin and for scripts (docs/people.md).

Every command first checks that the database exists and is migrated, before anything connects
to it (SQLite makes an empty file on connect): run against the wrong INSTANCE_PATH or
DATABASE_URL, a command says so in one line and leaves nothing behind.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import click
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import URL, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from jobs.models import ApiToken, Organisation, User, db
from webapp import people_ops as ops
from webapp.auth import create_token, find_user
from webapp.emails import external_url
from webapp.tokens import invitation_token


def fail(message: str) -> NoReturn:
    """One line on stderr ("Error: …") and exit status 1: never a traceback."""
    raise click.ClickException(message)


# The database check


def _where(url: URL) -> str:
    """The database, and the settings a person would fix, as this process read them."""
    named = os.environ.get("DATABASE_URL")
    shown = (url.database if url.get_backend_name() == "sqlite"
             else url.render_as_string(hide_password=True))
    return (f"{shown} (INSTANCE_PATH={current_app.instance_path}, DATABASE_URL "
            f"{'set' if named else 'not set'})")


def _revisions(url: URL) -> set[str] | None:
    """The database's alembic revisions (empty: not migrated); None when its SQLite file is
    missing. A SQLite file is opened read-only, so the check itself creates nothing."""
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database)
        if not path.is_file():
            return None
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            try:
                return {row[0] for row in conn.execute("SELECT version_num FROM alembic_version")}
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return set()
                raise
    with db.engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def require_database() -> None:
    """Stop, in one line, unless the database exists and is at the code's migration head."""
    url = db.engine.url
    fix = "run `flask db upgrade`, or point INSTANCE_PATH / DATABASE_URL at the right instance"
    try:
        found = _revisions(url)
    except (SQLAlchemyError, sqlite3.Error) as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        fail(f"cannot read the database {_where(url)}: {reason}; check DATABASE_URL, then "
             "`flask db upgrade`")
    heads = set(ScriptDirectory(current_app.extensions["migrate"].directory).get_heads())
    if found is None:
        fail(f"no database at {_where(url)}: {fix}")
    if found != heads:
        state = (f"at revision {', '.join(sorted(found))}, not {', '.join(sorted(heads))}"
                 if found else "not migrated")
        fail(f"the database {_where(url)} is {state}: {fix}")


def migrated(command: Callable) -> Callable:
    """Run `require_database` before the command (innermost decorator, below click's); a
    change the rules refuse (people_ops.Refused) is one line."""

    @functools.wraps(command)
    def checked(*args, **kwargs):
        require_database()
        try:
            return command(*args, **kwargs)
        except ops.Refused as exc:
            db.session.rollback()
            fail(str(exc))

    return checked


# Shared helpers


def _commit(conflict: str) -> None:
    """Commit; a unique constraint that another process beat us to is one line too."""
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        fail(conflict)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], empty: str) -> None:
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    if not rows:
        click.echo(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M} UTC" if at else "never"


def _user(email: str) -> User:
    user = find_user(email)
    if user is None:
        fail(f"no user {email.strip().lower()!r}; see `flask user list`")
    return user


def find_org(slug_or_key: str) -> Organisation:
    org = ops.find_org(slug_or_key)
    if org is None:
        fail(f"no organisation with slug or key {slug_or_key!r}; see `flask org list`")
    return org


# flask org


@click.group("org", cls=AppGroup)
def org_group() -> None:
    """Organisations: who sees which rows of the team's data."""


@org_group.command("create")
@click.argument("name")
@click.option("--key", required=True,
              help="The value of the tenant column on this organisation's rows.")
@migrated
def org_create(name: str, key: str) -> None:
    """Create the organisation NAME (its slug is made from the name)."""
    org = ops.create_org(name, key, actor=None)
    _commit(f"organisation {name.strip()!r} exists already")
    click.echo(f"Created organisation {org.name} (id {org.id}, slug {org.slug}, key "
               f"{org.data_key_or_id}).")


@org_group.command("list")
@migrated
def org_list() -> None:
    """Every organisation: id, slug, name, key and number of users."""
    rows = sorted(ops.users_per_org(), key=lambda row: row[0].id)
    _table(("id", "slug", "name", "key", "users"),
           [(o.id, o.slug, o.name, o.data_key_or_id, n) for o, n in rows],
           "No organisations yet: `flask org create NAME --key KEY`.")


@org_group.command("set-key")
@click.argument("slug")
@click.argument("key")
@migrated
def org_set_key(slug: str, key: str) -> None:
    """Set the value of the tenant column on the organisation's rows."""
    org = find_org(slug)
    ops.set_org_key(org, key, actor=None)
    _commit(f"could not set the key of {org.slug!r}")
    click.echo(f"{org.slug}: {org.data_key_or_id}")


# flask user


@click.group("user", cls=AppGroup)
def user_group() -> None:
    """People: accounts, roles, disabling."""


@user_group.command("create")
@click.argument("email")
@click.option("--org", "org_ref", required=True, metavar="SLUG_OR_KEY")
@click.option("--role", required=True, metavar="user|viewer|admin")
@click.option("--password-prompt", is_flag=True,
              help="Ask for the password now instead of printing an invitation link.")
@migrated
def user_create(email: str, org_ref: str, role: str, password_prompt: bool) -> None:
    """Create the user EMAIL; prints a one-time invitation link unless --password-prompt."""
    # Checked before the prompt, so a mistake is not found after typing a password twice.
    ops.check_new_email(email)
    org = find_org(org_ref)
    ops.check_role(role)
    password = (click.prompt("Password", hide_input=True, confirmation_prompt=True,
                             value_proc=_password) if password_prompt else None)
    user = ops.create_user(email, org, role, actor=None, password=password)
    _commit(f"a user {user.email!r} exists already")
    click.echo(f"Created {user.email} ({role}) in {org.name} ({org.slug}).")
    if not password_prompt:
        days = current_app.config["INVITATION_TTL"].days
        click.echo(f"Invitation link (works once, for {days} days):")
        click.echo(external_url(f"/invitation/{invitation_token(user)}"))


def _password(value: str) -> str:
    """The web form's rule; click asks again when it is not met."""
    if not 8 <= len(value) <= 200:
        raise click.BadParameter("a password must be 8 to 200 characters")
    return value


@user_group.command("list")
@click.option("--org", "org_ref", metavar="SLUG_OR_KEY", help="Only this organisation's.")
@migrated
def user_list(org_ref: str | None) -> None:
    """Every user (or one organisation's): id, email, organisation, role, state."""
    query = select(User).join(User.organisation).order_by(Organisation.slug, User.email)
    if org_ref is not None:
        query = query.where(User.org_id == find_org(org_ref).id)

    def state(user: User) -> str:
        if user.disabled_at:
            return f"disabled since {_when(user.disabled_at)}"
        return ops.state(user)

    _table(("id", "email", "org", "role", "state"),
           [(u.id, u.email, u.organisation.slug, u.role, state(u))
            for u in db.session.scalars(query)],
           "No users.")


@user_group.command("set-role")
@click.argument("email")
@click.argument("role", metavar="user|viewer|admin")
@migrated
def user_set_role(email: str, role: str) -> None:
    """Change a user's role; it counts from their next request."""
    user = _user(email)
    was = ops.set_role(user, role, actor=None)
    _commit(f"could not change the role of {user.email!r}")
    click.echo(f"{user.email}: {role} (was {was})")


@user_group.command("disable")
@click.argument("email")
@migrated
def user_disable(email: str) -> None:
    """No more logging in; open sessions end and API tokens stop at the next request. Jobs
    and files stay."""
    user = _user(email)
    ops.disable(user, actor=None)
    _commit(f"could not disable {user.email!r}")
    click.echo(f"{user.email}: disabled since {_when(user.disabled_at)}")


@user_group.command("enable")
@click.argument("email")
@migrated
def user_enable(email: str) -> None:
    """Undo `disable`: logging in and the API tokens work again."""
    user = _user(email)
    ops.enable(user, actor=None)
    _commit(f"could not enable {user.email!r}")
    click.echo(f"{user.email}: enabled")


@user_group.command("move")
@click.argument("email")
@click.argument("org_ref", metavar="SLUG_OR_KEY")
@migrated
def user_move(email: str, org_ref: str) -> None:
    """Move a user to another organisation: they see its rows from their next request, and no
    longer the jobs and files of the old one."""
    user, org = _user(email), find_org(org_ref)
    ops.move(user, org, actor=None)
    _commit(f"could not move {user.email!r}")
    click.echo(f"{user.email}: now in {org.name} ({org.slug})")


# flask token


@click.group("token", cls=AppGroup)
def token_group() -> None:
    """Personal API tokens."""


@token_group.command("create")
@click.argument("email")
@click.option("--name", help="What the token is for, shown by `flask token list`.")
@migrated
def token_create(email: str, name: str | None) -> None:
    """Create a personal API token for EMAIL; it is printed once and stored hashed."""
    user, name = _user(email), (name or "").strip() or None
    if not user.is_active:
        fail(f"{user.email} is disabled: `flask user enable {user.email}` first")
    if name and len(name) > 100:
        fail("a token's name is at most 100 characters")
    click.echo(create_token(user, name))


@token_group.command("list")
@click.argument("email")
@migrated
def token_list(email: str) -> None:
    """EMAIL's tokens: id, name, created, last used (to the minute)."""
    user = _user(email)
    tokens = db.session.scalars(select(ApiToken).where(ApiToken.user_id == user.id)
                                .order_by(ApiToken.id))
    _table(("id", "name", "created", "last used"),
           [(t.id, t.name, _when(t.created_at), _when(t.last_used_at)) for t in tokens],
           f"{user.email} has no API tokens.")


@token_group.command("revoke")
@click.argument("token_id", metavar="ID")
@migrated
def token_revoke(token_id: str) -> None:
    """Delete the token ID (from `flask token list`): it stops working at once."""
    ident = ops.row_id(token_id)
    token = db.session.get(ApiToken, ident) if ident is not None else None
    if token is None:
        fail(f"no API token with id {token_id!r}; see `flask token list EMAIL`")
    email = token.user.email
    db.session.delete(token)
    _commit(f"could not revoke token {token_id}")
    click.echo(f"Revoked token {token_id} of {email}.")


GROUPS = (org_group, user_group, token_group)  # registered by webapp.cli.init_app
