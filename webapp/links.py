"""Pages behind the links we email or print: signed downloads, password resets, invitations, and
the dev outbox."""

from __future__ import annotations

import re
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from ipaddress import ip_address

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy.exc import IntegrityError
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, EqualTo, Length

from jobs.mail import outbox
from jobs.models import ExportJob, JobState, User, db, locked
from jobs.storage import storage
from webapp import emails
from webapp.auth import end_sessions, find_user
from webapp.downloads import send_export
from webapp.exports import owns
from webapp.tokens import (
    DownloadGrant,
    ExpiredToken,
    InvalidToken,
    read_download_token,
    user_for_invitation_token,
    user_for_reset_token,
)

bp = Blueprint("links", __name__)
TAMPERED = "This download link is not valid: it may have been cut short or changed."


def _granted_job(token: str) -> tuple[DownloadGrant, ExportJob]:
    """The job a genuine link names, still owned by the user it was issued to; 403 otherwise."""
    try:
        grant = read_download_token(token)
    except InvalidToken:
        abort(403, TAMPERED)
    job = db.session.get(ExportJob, grant.job_id)
    if job is None or job.user_id != grant.user_id:
        abort(403, TAMPERED)
    if not job.user.is_active:  # a link is a credential too: disabling its owner ends it
        abort(403, "This link's account is disabled.")
    if job.org_id != job.user.org_id:  # its owner moved: the old organisation's file stays there
        abort(403, "This link's account has moved to another organisation.")
    return grant, job


def _file_gone(job: ExportJob) -> bool:
    return job.state == JobState.EXPIRED or not job.file_name or not storage().exists(
        job.file_name)


@bp.get("/d/<token>")
def download(token: str):
    grant, job = _granted_job(token)
    if current_app.config["DOWNLOAD_LINK_LOGIN"]:
        if not current_user.is_authenticated:
            return redirect(url_for("auth.login", next=request.path))
        if not (owns(current_user, job) or current_user.is_staff):
            abort(403, "This link belongs to another account.")
    if job.state not in (JobState.SUCCEEDED, JobState.EXPIRED):
        abort(404, "This export has no file to download.")
    if _file_gone(job):
        return _removed(job, token)
    if grant.expired:
        return render_template("links/expired.html", job=job, token=token), 410
    current_app.logger.info("job %s downloaded by emailed link", job.id)
    return send_export(job)


def _removed(job: ExportJob, token: str):
    owner = current_user.is_authenticated and current_user.id == job.user_id
    days = current_app.config["EXPORT_RETENTION"].days
    return render_template("links/removed.html", job=job, token=token, owner=owner,
                           days=days), 410


@bp.post("/d/<token>/renew")
def renew(token: str):
    """Email a fresh link to the job's owner (never to the caller), once per expired link."""
    grant, job = _granted_job(token)
    if not grant.expired:
        return redirect(url_for("links.download", token=token), code=303)
    if job.state != JobState.SUCCEEDED or _file_gone(job):
        return _removed(job, token)
    emails.fresh_download_link(job, grant)
    db.session.commit()
    return render_template("links/renewed.html", job=job)


class ResetRequestForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=254)])


class NewPasswordForm(FlaskForm):
    password = PasswordField("New password", validators=[
        DataRequired(), Length(min=8, max=200, message="must be 8 to 200 characters")])
    confirm = PasswordField("Repeat it", validators=[
        DataRequired(), EqualTo("password", message="must match the new password")])


@bp.route("/password-reset", methods=["GET", "POST"])
def password_reset_request():
    """The same answer whether or not the address has an account: it must not tell which."""
    form = ResetRequestForm()
    if request.method == "GET":
        return render_template("password_reset/request.html", form=form)
    if not form.validate():
        return render_template("password_reset/request.html", form=form), 400
    user = find_user(form.email.data)
    if user is not None and user.is_active:
        try:
            emails.password_reset(user)
            db.session.commit()
        except IntegrityError:  # a second request in the same minute: one email is enough
            db.session.rollback()
    return render_template("password_reset/sent.html")


@bp.route("/password-reset/<token>", methods=["GET", "POST"])
def password_reset(token: str):
    return _choose_password(token, user_for_reset_token, invitation=False)


@bp.route("/invitation/<token>", methods=["GET", "POST"])
def invitation(token: str):
    """The link `flask user create` prints: the newcomer chooses a password, once."""
    return _choose_password(token, user_for_invitation_token, invitation=True)


def _choose_password(token: str, user_for: Callable[[str], User], invitation: bool):
    """Set the password of the user a genuine token names; the token carried the old
    password's fingerprint, so it is void once this commits."""
    form = NewPasswordForm()
    try:
        user = user_for(token)
        if request.method == "POST" and form.validate():
            locked(User, user.id)  # a double submit waits here, then finds the link used
            user = user_for(token)
            user.set_password(form.password.data)
            end_sessions(user)  # whoever knew the old password is logged out everywhere
            db.session.commit()
            current_app.logger.info("user %s %s", user.id, "accepted their invitation"
                                    if invitation else "reset their password")
            flash("Your password is set. Log in with it." if invitation else
                  "Your password was changed. Log in with the new one.", "info")
            return redirect(url_for("auth.login"), code=303)
    except (ExpiredToken, InvalidToken) as exc:
        db.session.rollback()
        expired = isinstance(exc, ExpiredToken)
        return render_template("password_reset/invalid.html", expired=expired,
                               invitation=invitation), 410 if expired else 400
    status = 400 if request.method == "POST" else 200
    return render_template("password_reset/form.html", form=form, invitation=invitation), status


OUTBOX_NAME = re.compile(r"[\w-]+\.eml")


def _outbox_open() -> None:
    """The outbox holds live reset links: development only, no SMTP configured, local callers."""
    config = current_app.config
    try:
        local = ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        local = False
    if config["PRODUCTION"] or config["SMTP_URL"] or not local:
        abort(404)


def _read(name: str):
    with open(outbox() / name, "rb") as fh:
        return BytesParser(policy=policy.default).parse(fh)


@bp.get("/dev/outbox")
def dev_outbox():
    _outbox_open()
    folder = outbox()
    names = sorted((p.name for p in folder.glob("*.eml")), reverse=True) if folder.is_dir() else []
    messages = [(name, _read(name)) for name in names[:200]]
    return render_template("dev/outbox.html", messages=messages)


@bp.get("/dev/outbox/<name>")
def dev_outbox_message(name: str):
    _outbox_open()
    if not OUTBOX_NAME.fullmatch(name) or not (outbox() / name).is_file():
        abort(404)
    message = _read(name)
    text = message.get_body(preferencelist=("plain",))
    return render_template("dev/message.html", name=name, message=message,
                           text=text.get_content() if text else "")
