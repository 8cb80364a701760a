"""Who is asking: session login for people (server-side sessions, a limit on guessing),
personal bearer tokens for scripts, CSRF for both."""

from __future__ import annotations

import hashlib
import math
import secrets
from datetime import datetime, timedelta
from functools import cache
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import delete, select, update
from sqlalchemy.orm import joinedload
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired

from jobs.models import ApiToken, LoginFailure, User, UserSession, db, utcnow
from webapp.extensions import csrf, login_manager
from webapp.views import is_htmx

bp = Blueprint("auth", __name__)
login_manager.login_view = "auth.login"
login_manager.login_message = "Please log in to continue."


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# Server-side sessions: the cookie carries only a random id ("sid"); its UserSession row says
# whether it is still a login. Flask-Login's "remember me" cookie is never set, and a session
# without an open row loads nobody, so no other cookie can stand in for a login.

SESSION_ID = "sid"


def _session_hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def _open_session(sid: object) -> UserSession | None:
    if not isinstance(sid, str) or not sid:
        return None
    row = db.session.scalar(select(UserSession).options(joinedload(UserSession.user))
                            .where(UserSession.token_hash == _session_hash(sid)))
    if row is None or row.ended_at is not None:
        return None
    return row if row.created_at > utcnow() - current_app.config["SESSION_MAX_AGE"] else None


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """The session's user, read on every request: only while its UserSession is open and the
    user active, so logout, a password change, disabling or a new role count at once."""
    row = _open_session(session.get(SESSION_ID))
    if row is None or str(row.user_id) != user_id or not row.user.is_active:
        return None
    g.user_session = row
    return row.user


def current_session() -> UserSession | None:
    """This request's UserSession: None when a bearer token (or nobody) is asking."""
    return g.get("user_session") if current_user.is_authenticated else None


def start_session(user: User) -> UserSession:
    """Log `user` in on a new server-side session. Whatever the cookie held is dropped first,
    and a login it named is ended: an id seen or planted before login never becomes one."""
    previous = _open_session(session.get(SESSION_ID))
    if previous is not None:
        previous.ended_at = utcnow()
    session.clear()
    sid = secrets.token_urlsafe(32)
    row = UserSession(user=user, token_hash=_session_hash(sid))
    db.session.add(row)
    db.session.commit()
    session[SESSION_ID] = sid
    login_user(user)
    g.user_session = row
    return row


def end_sessions(user: User, keep: UserSession | None = None) -> int:
    """End every open session of `user` except `keep` (a password change keeps the changer's
    own): their cookies stop working on the next request. The caller commits."""
    query = update(UserSession).where(UserSession.user_id == user.id,
                                      UserSession.ended_at.is_(None))
    if keep is not None:
        query = query.where(UserSession.id != keep.id)
    return db.session.execute(query.values(ended_at=utcnow())).rowcount


TOKEN_USE_PRECISION = timedelta(minutes=1)


@login_manager.request_loader
def load_user_from_token(_request) -> User | None:
    token = _bearer_token()
    if token is None:
        return None
    row = db.session.scalar(select(ApiToken).where(ApiToken.token_hash == ApiToken.hash(token)))
    if row is None or not row.user.is_active:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= TOKEN_USE_PRECISION:
        # At most one write a minute per token. This runs when `login_required` first asks
        # for the user, before the view has changed anything, so the commit holds only this.
        row.last_used_at = now
        db.session.commit()
    return row.user


@login_manager.unauthorized_handler
def unauthorized():
    if request.path.startswith("/api/"):
        return jsonify(error="authentication required"), 401
    if is_htmx():
        # a poll after the session ended: send the whole page to the login form, not a fragment
        page = urlsplit(request.headers.get("HX-Current-URL", "")).path or request.path
        return "", 401, {"HX-Redirect": url_for("auth.login", next=page)}
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


@bp.before_app_request
def check_csrf() -> None:
    """CSRF on every unsafe request, except those a bearer token authenticates (no cookies)."""
    if request.method not in ("GET", "HEAD", "OPTIONS", "TRACE") and _bearer_token() is None:
        csrf.protect()


def create_token(user: User, name: str | None = None) -> str:
    """A new personal API token; only its hash is stored, so it is shown once."""
    token = "xd_" + secrets.token_urlsafe(32)
    db.session.add(ApiToken(user=user, token_hash=ApiToken.hash(token), name=name))
    db.session.commit()
    return token


def find_user(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == email.strip().lower()))


# The guessing limit: failed logins per account (the email as typed) and per client address,
# counted in the database so every web process sees the same failures.

PRUNE_BATCH = 100


def _failures_wait(column, value: str, now: datetime) -> timedelta | None:
    """How long until `value` (an email or an address) is under the limit again; None when it
    is under it now. The limit-th newest failure in the window is the one that must age out."""
    limit = current_app.config["LOGIN_FAILURE_LIMIT"]
    window = current_app.config["LOGIN_FAILURE_WINDOW"]
    if limit <= 0:
        return None
    nth = db.session.scalar(
        select(LoginFailure.at).where(column == value, LoginFailure.at > now - window)
        .order_by(LoginFailure.at.desc()).offset(limit - 1).limit(1))
    return None if nth is None else nth + window - now


def login_wait(email: str, address: str) -> timedelta | None:
    """How long this email and address must wait before trying again; None: they may try."""
    now = utcnow()
    waits = [w for w in (_failures_wait(LoginFailure.email, email, now),
                         _failures_wait(LoginFailure.address, address, now)) if w is not None]
    return max(waits) if waits else None


def record_failure(email: str, address: str) -> None:
    """Count a failed login, and delete failures too old to count. Only the oldest few rows
    (by id, so by time) are looked at: the pruning never scans the table."""
    now = utcnow()
    cutoff = now - current_app.config["LOGIN_FAILURE_WINDOW"]
    oldest = (select(LoginFailure.id, LoginFailure.at).order_by(LoginFailure.id)
              .limit(PRUNE_BATCH).subquery())
    db.session.execute(
        delete(LoginFailure).where(LoginFailure.id.in_(
            select(oldest.c.id).where(oldest.c.at <= cutoff))),
        execution_options={"synchronize_session": False})
    db.session.add(LoginFailure(at=now, email=email, address=address))
    db.session.commit()


@cache
def _decoy_hash() -> str:
    return generate_password_hash(secrets.token_hex(16))


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired()])
    password = PasswordField("Password", validators=[DataRequired()])


def _safe_next(target: str | None) -> str:
    """Only same-site paths: an open redirect would make our login page a phishing tool."""
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(
        target
    ).netloc:
        return target
    return url_for("exports.new")


def _too_many(form: LoginForm, wait: timedelta):
    """The same answer for every email, known or not: it must not tell which exist."""
    minutes = max(1, math.ceil(wait.total_seconds() / 60))
    flash(f"Too many failed logins; try again in {minutes} minute{'s' * (minutes != 1)}.",
          "error")
    return render_template("login.html", form=form), 429, {
        "Retry-After": str(max(1, math.ceil(wait.total_seconds())))}


@bp.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        email = form.email.data.strip().lower()[:254]
        address = (request.remote_addr or "")[:64]
        wait = login_wait(email, address)
        if wait is not None:
            return _too_many(form, wait)
        user = find_user(email)
        if user is None:
            check_password_hash(_decoy_hash(), form.password.data)  # as long as a real check
        if user is None or not user.check_password(form.password.data):
            record_failure(email, address)
            flash("Wrong email or password.", "error")
        elif not user.is_active:  # the right password: saying so tells nothing new
            flash("This account is disabled: ask an admin to enable it.", "error")
        else:
            # The account's failures go (its owner got in). Those on other emails stay, and
            # with them the address's count: else one account of an attacker's own would
            # reset the limit at will.
            db.session.execute(delete(LoginFailure).where(LoginFailure.email == email))
            start_session(user)
            return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", form=form), 200 if request.method == "GET" else 400


@bp.post("/logout")
@login_required
def logout():
    """End the session on the server too: a copy of the cookie is worth nothing after."""
    row = current_session()
    if row is not None:
        row.ended_at = utcnow()
        db.session.commit()
    session.clear()
    logout_user()
    return redirect(url_for("auth.login"))
