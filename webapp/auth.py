"""Who is asking: session login for people, personal bearer tokens for scripts, CSRF for both."""

from __future__ import annotations

import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Blueprint, flash, jsonify, redirect, render_template, request, url_for
from flask_login import login_required, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired

from jobs.models import ApiToken, User, db, utcnow
from webapp.extensions import csrf, login_manager
from webapp.views import is_htmx

bp = Blueprint("auth", __name__)
login_manager.login_view = "auth.login"
login_manager.login_message = "Please log in to continue."


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """The session's user, read on every request: disabling or a new role counts at once."""
    user = db.session.get(User, int(user_id)) if user_id.isdigit() else None
    return user if user is not None and user.is_active else None


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


@bp.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        user = find_user(form.email.data)
        if user is None or not user.check_password(form.password.data):
            flash("Wrong email or password.", "error")
        elif not login_user(user):  # refused: the account is disabled
            flash("This account is disabled: ask an admin to enable it.", "error")
        else:
            return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", form=form), 200 if request.method == "GET" else 400


@bp.post("/logout")
@login_required
def logout():
    logout_user()
    return redirect(url_for("auth.login"))
