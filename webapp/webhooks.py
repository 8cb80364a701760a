"""Webhook pages: my endpoints, registering one (its secret shown once), rotating its secret,
and each endpoint's delivery log with "Resend"."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from jobs import webhooks
from jobs.datasets import InvalidParams
from jobs.models import User, WebhookDelivery, WebhookEndpoint, db
from webapp.views import job_action, refused

bp = Blueprint("webhooks", __name__)


def endpoint_for(user: User, endpoint_id: int) -> WebhookEndpoint:
    """The user's own endpoint (made in their organisation), or an admin's organisation-wide
    one of their organisation; 404 otherwise, so ids leak nothing."""
    endpoint = db.session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.org_id != user.org_id or not (
            endpoint.user_id == user.id or endpoint.organisation_wide and user.is_admin):
        abort(404)
    return endpoint


def delivery_for(user: User, endpoint_id: int, delivery_id: int) -> WebhookDelivery:
    """A delivery of one of the user's endpoints (`endpoint_for`); 404 otherwise."""
    endpoint = endpoint_for(user, endpoint_id)
    delivery = db.session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.endpoint_id != endpoint.id:
        abort(404)
    return delivery


def _index(errors: dict, values: dict, status: int = 200):
    reach = WebhookEndpoint.user_id == current_user.id
    if current_user.is_admin:
        reach = reach | WebhookEndpoint.organisation_wide
    endpoints = db.session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.org_id == current_user.org_id, reach).order_by(WebhookEndpoint.id))
    return render_template("webhooks/index.html", endpoints=list(endpoints), errors=errors,
                           values=values, events=webhooks.EVENTS), status


def _show(endpoint: WebhookEndpoint, secret: str | None = None, status: int = 200):
    return render_template("webhooks/show.html", endpoint=endpoint, secret=secret,
                           deliveries=webhooks.deliveries(endpoint),
                           events=webhooks.EVENTS), status


@bp.get("/webhooks")
@login_required
def index():
    return _index({}, {"events": list(webhooks.EVENTS)})


@bp.post("/webhooks")
@login_required
def create():
    values = {"url": request.form.get("url", "").strip(),
              "events": request.form.getlist("events"),
              "organisation_wide": request.form.get("organisation_wide") == "on"}
    try:
        endpoint = webhooks.define(WebhookEndpoint(), current_user, values)
    except InvalidParams as exc:
        db.session.rollback()
        return _index(exc.errors, values, 400)
    db.session.add(endpoint)
    db.session.commit()
    return _show(endpoint, endpoint.secret, 201)


@bp.get("/webhooks/<int:endpoint_id>")
@login_required
def show(endpoint_id: int):
    return _show(endpoint_for(current_user, endpoint_id))


@bp.post("/webhooks/<int:endpoint_id>/rotate")
@login_required
def rotate(endpoint_id: int):
    endpoint = endpoint_for(current_user, endpoint_id)
    secret = webhooks.rotate(endpoint)
    db.session.commit()
    return _show(endpoint, secret)


@bp.post("/webhooks/<int:endpoint_id>/delete")
@login_required
def delete(endpoint_id: int):
    db.session.delete(endpoint_for(current_user, endpoint_id))
    db.session.commit()
    flash("Webhook endpoint deleted.", "info")
    return redirect(url_for("webhooks.index"), code=303)


@bp.post("/webhooks/<int:endpoint_id>/deliveries/<int:delivery_id>/resend")
@login_required
def resend(endpoint_id: int, delivery_id: int):
    delivery = delivery_for(current_user, endpoint_id, delivery_id)
    reason = job_action(delivery, webhooks.resend)
    if reason is not None:
        return refused(reason)
    flash(f"Delivery {delivery.event_id} is being sent again.", "info")
    return redirect(url_for("webhooks.show", endpoint_id=endpoint_id), code=303)
