"""View helpers every blueprint shares: the htmx-aware render and the cancel/retry step."""

from __future__ import annotations

from collections.abc import Callable

from flask import Response, make_response, render_template, request

from jobs import dispatch
from jobs.models import db


def is_htmx() -> bool:
    """Whether htmx sent this request (it wants a fragment, not the whole page)."""
    return request.headers.get("HX-Request") == "true"


def render(template: str, status: int = 200, **context) -> Response:
    """A page or an htmx fragment of the same URL; Vary keeps a browser from showing a cached
    fragment in place of the full page."""
    response = make_response(render_template(template, **context), status)
    response.vary.add("HX-Request")
    return response


def refused(reason: str, status: int = 409):
    """The error page for an action the state did not allow (a page, not a fragment)."""
    return render_template("error.html", status=status, message=reason), status


def job_action(row, change: Callable[..., None], *args, **kwargs) -> str | None:
    """Run change(row, *args, **kwargs) (dispatch.cancel or retry, or one that also writes
    the audit log) and commit: None when done; when the row's state does not allow it
    (dispatch.WrongState), roll back and return the reason, which the caller answers with
    409 in its own shape (page, fragment or JSON)."""
    try:
        change(row, *args, **kwargs)
    except dispatch.WrongState as exc:
        db.session.rollback()
        return str(exc)
    db.session.commit()
    return None
