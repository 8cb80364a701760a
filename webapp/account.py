"""/account: a person's own page: who they are, their password, their personal API tokens."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from jobs.models import ApiToken, db
from webapp.auth import create_token, current_session, end_sessions
from webapp.links import NewPasswordForm
from webapp.views import is_htmx, render

bp = Blueprint("account", __name__, url_prefix="/account")


@bp.before_request
@login_required
def _logged_in() -> None:
    """Every page here is the logged-in person's own, and needs their login: an API token
    cannot make more tokens or change the password."""
    if current_session() is None:
        abort(403, "Your account page needs you logged in, not an API token.")


class PasswordForm(NewPasswordForm):
    """The reset form's rules for the new password, and the current one to prove it is you."""

    current_password = PasswordField("Current password", validators=[
        DataRequired(message="is required.")])


class TokenForm(FlaskForm):
    name = StringField("Name of a new token", validators=[
        DataRequired(message="Give the token a name: what is it for?"),
        Length(max=100, message="A name is at most 100 characters.")],
        filters=[lambda value: value.strip() if isinstance(value, str) else value])


def _tokens() -> list[ApiToken]:
    return list(db.session.scalars(select(ApiToken).where(ApiToken.user_id == current_user.id)
                                   .order_by(ApiToken.id.desc())))


def _own_token(token_id: int) -> ApiToken:
    """One of the person's tokens; anyone else's is as absent as one that never existed."""
    token = db.session.get(ApiToken, token_id) if token_id < 2**31 else None  # an int4 key
    if token is None or token.user_id != current_user.id:
        abort(404, "No such token among yours.")
    return token


def _page(status: int = 200, password_form: PasswordForm | None = None,
          token_form: TokenForm | None = None, **context):
    return render_template(
        "account/index.html", tokens=_tokens(), **context,
        password_form=password_form or PasswordForm(formdata=None),
        token_form=token_form or TokenForm(formdata=None)), status


@bp.get("")
def index():
    return _page()


@bp.post("/password")
def change_password():
    """A new password; every other session of the person ends (a thief's among them), this
    one stays."""
    form = PasswordForm()
    if not form.validate():
        return _page(400, password_form=form)
    if not current_user.check_password(form.current_password.data):
        form.current_password.errors.append("is not your password.")
        return _page(400, password_form=form)
    current_user.set_password(form.password.data)
    ended = end_sessions(current_user, keep=current_session())
    db.session.commit()
    current_app.logger.info("user %s changed their password; %d other sessions ended",
                            current_user.id, ended)
    flash("Your password was changed. Everywhere else you were logged in, you are now "
          "logged out.", "info")
    return redirect(url_for("account.index"), code=303)


@bp.post("/tokens")
def create():
    """A new token, on this answer only: it is stored hashed."""
    form = TokenForm()
    if not form.validate():
        return _page(400, token_form=form)
    token = create_token(current_user, form.name.data)
    return _page(new_token=token, new_name=form.name.data)


@bp.get("/tokens/<int:token_id>/revoke")
def confirm_revoke(token_id: int):
    """The confirmation step when JavaScript is off (htmx asks with a dialog instead)."""
    return render_template("account/confirm_revoke.html", token=_own_token(token_id))


@bp.post("/tokens/<int:token_id>/revoke")
def revoke(token_id: int):
    token = _own_token(token_id)
    notice = f"Token “{token.name or f'#{token.id}'}” revoked: it no longer works."
    db.session.delete(token)
    db.session.commit()
    if is_htmx():
        return render("account/_tokens.html", tokens=_tokens(), notice=notice,
                      token_form=TokenForm(formdata=None))
    flash(notice, "info")
    return redirect(url_for("account.index", _anchor="tokens"), code=303)
