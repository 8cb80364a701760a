"""The headers every response carries, set in one place: security headers and caching."""

from __future__ import annotations

from flask import Flask, Response, current_app, request

# Only our own files run or style a page: htmx is vendored in static/, no inline script or
# style attribute anywhere (htmx's indicator style is off and lives in our stylesheet).
CSP = ("default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
# Pages whose URL or body holds a token (emailed links, the outbox, /account with a new API
# token): no Referer leaks it to another site.
TOKEN_BLUEPRINTS = frozenset({"links", "account"})


def security_headers(response: Response) -> Response:
    """Set the security headers on every answer, and `private, no-store` on everything but
    the public static files, which keep their normal caching.

    Also drops a `Date` set by the app (werkzeug's `make_conditional` adds one to downloads
    and static files): every server (the dev server, gunicorn) sends its own, so ours would
    be the second."""
    headers = response.headers
    headers.pop("Date", None)
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    token_page = request.blueprint in TOKEN_BLUEPRINTS
    headers["Referrer-Policy"] = "no-referrer" if token_page else "strict-origin-when-cross-origin"
    if current_app.config.get("PRODUCTION"):
        headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    if request.endpoint != "static":
        headers["Cache-Control"] = "private, no-store"
    return response


def init_app(app: Flask) -> None:
    """Register the hook on the app, not a blueprint: error pages and static files get it too."""
    app.after_request(security_headers)
