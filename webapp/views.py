"""View helpers every blueprint shares: the htmx-aware render, the cancel/retry step, the
words of HTTP errors and the machine-readable time of a <time> element."""

from __future__ import annotations

from collections.abc import Callable

from flask import Response, make_response, render_template, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

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


# Our words for HTTP errors raised without a message of their own (Werkzeug's defaults speak
# to developers: "If you entered the URL manually please check your spelling").
HTTP_MESSAGES = {
    400: "The request could not be understood; please check what was sent.",
    401: "Please log in first.",
    403: "You do not have access to this.",
    404: "There is nothing at this address: it may be mistyped, or what it showed is gone.",
    410: "What was here has been removed.",
    413: "What was sent is too large.",
    415: "This kind of content is not accepted here.",
    429: "Too many requests; please wait a moment and try again.",
}


def http_message(exc: HTTPException) -> str:
    """The message for an HTTP error: the one a view gave (`abort(403, "…")`), else ours."""
    if exc.description and exc.description != type(exc).description:
        return exc.description
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        allowed = sorted(set(exc.valid_methods) - {"HEAD", "OPTIONS"})
        return f"{request.method} is not allowed at this address; use {' or '.join(allowed)}."
    return HTTP_MESSAGES.get(exc.code or 500,
                             "Something went wrong on our side; it has been logged."
                             if (exc.code or 500) >= 500 else f"{exc.name}.")
