"""/admin/people: organisations and their users, invitations, roles, disabling, moves, and the
audit log of these actions. Admins act; viewers see the pages without a form (their POSTs get
403); anyone else gets 403. Every change goes through webapp.people_ops, as the CLI's do."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, request, url_for
from flask_login import current_user
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import MultiDict

from jobs.models import AdminAction, ExportJob, Organisation, OutboundEmail, User, db
from webapp import admin, emails, views
from webapp import people_ops as ops
from webapp.admin import admin_required, staff_required

bp = Blueprint("people", __name__, url_prefix="/people")
admin.bp.register_blueprint(bp)  # endpoints admin.people.*, under /admin/people
SHOWN = 500  # users on one page; the organisation filter narrows it


def _render(template: str, status: int = 200, **context):
    orgs_by_id = dict(db.session.execute(select(Organisation.id, Organisation.name)).all())
    return views.render(template, status, base=url_for("admin.home"),
                        can_act=current_user.is_admin, roles=ops.ROLES, state=ops.state,
                        orgs_by_id=orgs_by_id, **context)


def _people_log(where=None) -> list[AdminAction]:
    """The latest actions on people and organisations (newest first)."""
    query = select(AdminAction).where(or_(AdminAction.subject_user_id.is_not(None),
                                          AdminAction.org_id.is_not(None)))
    if where is not None:
        query = query.where(where)
    return list(db.session.scalars(query.order_by(AdminAction.id.desc()).limit(50)))


def _page(status: int = 200, errors: dict | None = None, form: MultiDict | None = None):
    orgs = ops.users_per_org()
    chosen = next((o for o, _ in orgs if o.slug == request.args.get("org")), None)
    query = select(User).join(User.organisation).order_by(Organisation.name, User.email)
    if chosen is not None:
        query = query.where(User.org_id == chosen.id)
    users = db.session.scalars(query.limit(SHOWN + 1)).all()
    log = _people_log(AdminAction.org_id == chosen.id if chosen is not None else None)
    return _render("admin/people.html", status, orgs=orgs, chosen=chosen,
                   org_choices=[(o.id, o.name) for o, _ in orgs],
                   role_choices=[(r, r) for r in ops.ROLES],
                   users=users[:SHOWN], more=len(users) > SHOWN, actions=log,
                   errors=errors or {}, form=form or MultiDict())


@bp.get("/")
@staff_required
def index():
    return _page()


def _sentence(message: str) -> str:
    """An operation's reason as a sentence on a page (an email address keeps its case)."""
    return message if "@" in message.split(" ", 1)[0] else message[:1].upper() + message[1:]


def _refused_form(exc: Exception, form_name: str, field: str):
    """The page again, 400, with the reason beside the field it is about (`field`, unless the
    refusal names another)."""
    db.session.rollback()
    field = getattr(exc, "field", "") or field
    message = str(exc) if isinstance(exc, ops.Refused) else "it exists already"
    return _page(400, errors={f"{form_name}-{field}": _sentence(message)}, form=request.form)


@bp.post("/orgs")
@admin_required
def create_org():
    try:
        org = ops.create_org(request.form.get("name", ""), request.form.get("key", ""),
                             current_user)
        db.session.commit()
    except (ops.Refused, IntegrityError) as exc:  # IntegrityError: another admin was faster
        return _refused_form(exc, "org", "name")
    flash(f"Organisation {org.name} created (slug {org.slug}, data key {org.data_key}).",
          "info")
    return redirect(url_for(".index"), code=303)


def _org(value: str | None) -> Organisation:
    ident = ops.row_id(value or "")
    org = db.session.get(Organisation, ident) if ident is not None else None
    if org is None:
        raise ops.Refused("choose an organisation", "org")
    return org


@bp.post("/invite")
@admin_required
def invite():
    """Create the user without a password and email them a link to choose one (critical
    lane, after commit)."""
    form = request.form
    try:
        user = ops.create_user(form.get("email", ""), _org(form.get("org")),
                               form.get("role", ""), current_user)
        emails.invitation(user, current_user)
        db.session.commit()
    except (ops.Refused, IntegrityError) as exc:
        return _refused_form(exc, "invite", "email")
    flash(f"Invitation sent to {user.email} ({user.role} in {user.organisation.name}): the "
          "email is on its way (its state is under Invitations); the link in it works once.",
          "info")
    return redirect(url_for(".user", user_id=user.id), code=303)


def _found(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        abort(404)
    return user


def _user_page(user: User, status: int = 200, error: str = ""):
    invitations = db.session.scalars(
        select(OutboundEmail).where(OutboundEmail.kind == "invitation",
                                    OutboundEmail.to_address == user.email)
        .order_by(OutboundEmail.id.desc()).limit(10)).all()
    jobs = db.session.scalar(select(func.count(ExportJob.id))
                             .where(ExportJob.user_id == user.id))
    orgs = db.session.scalars(select(Organisation).order_by(Organisation.name)).all()
    return _render("admin/person.html", status, user=user, orgs=orgs, jobs=jobs,
                   invitations=invitations, error=error,
                   actions=_people_log(AdminAction.subject_user_id == user.id))


@bp.get("/users/<int:user_id>")
@staff_required
def user(user_id: int):
    return _user_page(_found(user_id))


@bp.get("/users/<int:user_id>/disable")
@admin_required
def confirm_disable(user_id: int):
    """The confirmation step without JavaScript (htmx asks with a dialog instead)."""
    return _render("admin/confirm_disable.html", user=_found(user_id))


def _change(user_id: int, apply, done: str):
    """Apply one people operation to the user and say so on their page; a refusal (the last
    admin, your own account) is 409 with the reason."""
    user = _found(user_id)
    try:
        apply(user)
        db.session.commit()
    except ops.Refused as exc:
        db.session.rollback()
        message = _sentence(str(exc)) + "."
        if views.is_htmx():
            flash(message, "error")
            return "", 200, {"HX-Redirect": url_for(".user", user_id=user.id)}
        return _user_page(user, 409, message)
    flash(done.format(user=user), "info")
    page = url_for(".user", user_id=user.id)
    if views.is_htmx():  # the dialog's POST: show the whole page again
        return "", 200, {"HX-Redirect": page}
    return redirect(page, code=303)


@bp.post("/users/<int:user_id>/role")
@admin_required
def set_role(user_id: int):
    role = request.form.get("role", "")
    return _change(user_id, lambda u: ops.set_role(u, role, current_user),
                   "{user.email} is now " + role + ": it counts from their next request.")


@bp.post("/users/<int:user_id>/disable")
@admin_required
def disable(user_id: int):
    return _change(user_id, lambda u: ops.disable(u, current_user),
                   "{user.email} is disabled: their sessions and API tokens no longer work. "
                   "Their exports and files stay.")


@bp.post("/users/<int:user_id>/enable")
@admin_required
def enable(user_id: int):
    return _change(user_id, lambda u: ops.enable(u, current_user),
                   "{user.email} is enabled: they can log in again.")


@bp.post("/users/<int:user_id>/invite-again")
@admin_required
def invite_again(user_id: int):
    def send_again(user: User) -> None:
        ops.reinvite(user, current_user)
        emails.invitation(user, current_user)

    return _change(user_id, send_again, "A new invitation is on its way to {user.email}; the "
                   "links in earlier ones no longer work.")


@bp.post("/users/<int:user_id>/move")
@admin_required
def move(user_id: int):
    org_value = request.form.get("org")
    return _change(user_id, lambda u: ops.move(u, _org(org_value), current_user),
                   "{user.email} moved to {user.organisation.name}: from now on they see "
                   "its data, and no longer their exports from before.")
