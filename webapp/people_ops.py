"""The people operations, each in one place: create an organisation or a user, set a role,
disable, enable, move to another organisation. The command line (webapp.people) and the admin
pages (webapp.admin_people) both call these, so a rule (one key per organisation, always an
active admin) holds whichever way a change comes.

Each operation writes its line of the audit log (AdminAction, the table of the job actions)
when a person acts from the admin pages (`actor`). From the command line there is no person to
name (`actor` None): nothing is written to the audit log, the app's log gets a line instead,
and the command prints what it did (docs/people.md). The caller commits.
"""

from __future__ import annotations

import re
import secrets
import unicodedata

from flask import current_app
from sqlalchemy import false, func, or_, select

from jobs.models import AdminAction, Organisation, User, db, utcnow, write_lock
from webapp.auth import end_sessions, find_user

ROLES = ("user", "viewer", "admin")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
NO_PASSWORD = "!"  # begins the hash of an invited user, who has no password yet


class Refused(ValueError):
    """A change the rules do not allow, in words for the person who asked: one line on the
    command line, a message beside `field` on a form."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def audit(actor: User | None, action: str, detail: str, subject: User | None = None,
          org: Organisation | None = None) -> None:
    """The audit line of a people action (who, when, what, on whom); from the command line
    (no actor) a line in the app's log instead."""
    if actor is None:
        current_app.logger.info("command line: %s %s %s", action,
                                subject.email if subject else org.slug if org else "", detail)
        return
    db.session.flush()  # a new user or organisation gets its id
    db.session.add(AdminAction(user_id=actor.id, action=action, detail=detail,
                               subject_user_id=subject.id if subject else None,
                               org_id=org.id if org else None))


def state(user: User) -> str:
    """active, invited (no password chosen yet) or disabled."""
    if user.disabled_at is not None:
        return "disabled"
    return "invited" if user.password_hash.startswith(NO_PASSWORD) else "active"


# Organisations


def slugify(name: str) -> str:
    """'Acme Café, Inc.' -> 'acme-cafe-inc'."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:60].rstrip("-")


def row_id(text: str) -> int | None:
    """TEXT as a row id, if it can be one (SQLite's integers stop at 2**63)."""
    return int(text) if text.isdigit() and int(text) < 2**63 else None


def _key_filter(key: str):
    """Organisations whose rows carry `key`: their data key, or their id when they have none."""
    ident = row_id(key)
    by_id = (Organisation.data_key.is_(None) & (Organisation.id == ident)
             if ident is not None else false())
    return or_(Organisation.data_key == key, by_id)


def find_org(slug_or_key: str) -> Organisation | None:
    """By slug, else by key (a slug wins: it is what `flask org list` names first)."""
    org = db.session.scalar(select(Organisation).where(Organisation.slug == slug_or_key))
    return org or db.session.scalar(select(Organisation).where(_key_filter(slug_or_key)))


def check_key(key: str, org: Organisation | None = None) -> str:
    """Two organisations with one key would see each other's rows: refuse."""
    key = key.strip()
    if not key or len(key) > 200:
        raise Refused("the key must be 1 to 200 characters", "key")
    others = select(Organisation).where(_key_filter(key))
    if org is not None:
        others = others.where(Organisation.id != org.id)
    other = db.session.scalar(others)
    if other is not None:
        raise Refused(f"organisation {other.slug!r} has the key {key!r} already: each "
                      "organisation's rows need a key of their own", "key")
    return key


def create_org(name: str, key: str, actor: User | None) -> Organisation:
    """A new organisation; its slug is made from its name."""
    name, slug = name.strip(), slugify(name)
    if not slug or len(name) > 120:
        raise Refused("the name must be at most 120 characters, with letters or digits for "
                      "its slug", "name")
    clash = db.session.scalar(select(Organisation).where(
        or_(Organisation.name == name, Organisation.slug == slug)))
    if clash is not None:
        raise Refused(f"organisation {clash.name!r} (slug {clash.slug!r}) exists already",
                      "name")
    org = Organisation(name=name, slug=slug, data_key=check_key(key))
    db.session.add(org)
    audit(actor, "org.create", f"{name} (slug {slug}, key {org.data_key})", org=org)
    return org


def set_org_key(org: Organisation, key: str, actor: User | None) -> None:
    was = org.data_key_or_id
    org.data_key = check_key(key, org)
    audit(actor, "org.key", f"{was} → {org.data_key}", org=org)


def users_per_org() -> list[tuple[Organisation, int]]:
    users = (select(func.count(User.id)).where(User.org_id == Organisation.id)
             .scalar_subquery())
    return [(o, n) for o, n in db.session.execute(
        select(Organisation, users).order_by(Organisation.name))]


# Users


def check_role(role: str) -> str:
    if role not in ROLES:
        raise Refused(f"unknown role {role!r}: choose {', '.join(ROLES)}", "role")
    return role


def check_new_email(email: str) -> str:
    """The address, lowercase, if it can be a new user's."""
    email = email.strip().lower()
    if not EMAIL.fullmatch(email) or len(email) > 254:
        raise Refused(f"not an email address: {email!r}", "email")
    if find_user(email) is not None:
        raise Refused(f"a user {email!r} exists already", "email")
    return email


def unusable_password_hash() -> str:
    """A password hash no password matches: "!" never begins a hash werkzeug makes, so every
    check fails. Random, so a new one changes the invitation link (webapp.tokens)."""
    return NO_PASSWORD + secrets.token_hex(16)


def create_user(email: str, org: Organisation, role: str, actor: User | None,
                password: str | None = None) -> User:
    """A new user with `password`, or invited: no password anyone knows (an unusable hash)
    until the invitation link (webapp.tokens.invitation_token) sets one."""
    email = check_new_email(email)
    check_role(role)
    user = User(email=email, organisation=org, role=role)
    if password is None:
        user.password_hash = unusable_password_hash()
    else:
        user.set_password(password)
    db.session.add(user)
    audit(actor, "user.invite" if password is None else "user.create",
          f"{role} in {org.name}", subject=user, org=org)
    return user


def reinvite(user: User, actor: User | None) -> None:
    """Make a new unusable password, so the link of every earlier invitation stops working
    (the caller sends the new one): for a lost or expired invitation."""
    if state(user) != "invited":
        raise Refused(f"{user.email} is {state(user)}: only an invited user who has not chosen a "
                      "password yet can be invited again", "state")
    user.password_hash = unusable_password_hash()
    audit(actor, "user.reinvite", "earlier invitation links stop working", subject=user,
          org=user.organisation)


def _active_admins() -> int:
    """How many active admins there are, counted under a lock held until the transaction
    ends: two admins demoting each other at once must not both see the other one left.
    PostgreSQL locks the admins' rows (a waiting count re-reads them once the other commits);
    SQLite takes its write lock up front (jobs.models.write_lock)."""
    active = select(User.id).where(User.role == "admin", User.disabled_at.is_(None))
    if write_lock():
        active = active.with_for_update()
    return len(db.session.scalars(active).all())


def _keep_an_admin(user: User, doing: str) -> None:
    """Never leave the console without an active admin: nobody could undo it from the pages."""
    if user.is_admin and user.is_active and _active_admins() <= 1:
        raise Refused(f"{user.email} is the last active admin: make someone else an admin "
                      f"before you {doing}", "role")


def set_role(user: User, role: str, actor: User | None) -> str:
    """Change the role (it counts from the user's next request); returns the old one."""
    was = user.role
    if check_role(role) == was:
        return was
    if role != "admin":
        _keep_an_admin(user, "change this role")
    user.role = role
    audit(actor, "user.role", f"{was} → {role}", subject=user, org=user.organisation)
    return was


def disable(user: User, actor: User | None) -> None:
    """No more logging in; open sessions end and API tokens stop at the next request. Jobs
    (running ones too) and files stay; admins still reach them."""
    if actor is not None and actor.id == user.id:
        raise Refused("you cannot disable your own account", "state")
    if user.disabled_at is not None:
        return
    _keep_an_admin(user, "disable this account")
    user.disabled_at = utcnow()
    ended = end_sessions(user)
    audit(actor, "user.disable", f"{ended} session(s) ended", subject=user,
          org=user.organisation)


def enable(user: User, actor: User | None) -> None:
    """Undo `disable`: logging in and the API tokens work again (ended sessions stay ended)."""
    if user.disabled_at is None:
        return
    user.disabled_at = None
    audit(actor, "user.enable", "", subject=user, org=user.organisation)


def move(user: User, org: Organisation, actor: User | None) -> None:
    """To another organisation: from the next request the user sees that organisation's rows,
    and no longer the jobs and files made in the old one (webapp.exports.owns). Their open
    sessions end, so nothing shown from the old organisation lingers in a page."""
    was = user.organisation
    if org.id == was.id:
        raise Refused(f"{user.email} is in {org.name} already", "org")
    user.organisation = org
    end_sessions(user)
    audit(actor, "user.move", f"{was.name} → {org.name}", subject=user, org=org)
