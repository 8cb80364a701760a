"""The Flask side of exportdesk: app factory, login, export pages, JSON API and CLI."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flask import Flask, current_app, jsonify, render_template, request
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError
from sqlalchemy import event, make_url
from sqlalchemy.engine import Engine
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from jobs import dataset_file, lanes, tasks  # noqa: F401 (tasks: declares every task on its lane)
from jobs.dataset_file import DatasetFileError
from jobs.models import db
from webapp import (
    account,
    admin,
    admin_people,  # noqa: F401 (admin_people nests itself in admin)
    api,
    auth,
    cli,
    config,
    emails,
    exports,
    headers,
    links,
    ops,
    schedules,
    times,
    views,
    webhooks,
)
from webapp.extensions import csrf, login_manager, migrate

ROOT = Path(__file__).resolve().parent.parent


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """Web, consumers and workers share SQLite files: WAL lets readers run beside one writer."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # a read-only connection (jobs.source) keeps the mode
            pass
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


class _Sessions(SecureCookieSessionInterface):
    """Cookie sessions whose first use makes the development key (config.ensure_secret_key):
    every request opens its session before anything else signs."""

    def get_signing_serializer(self, app: Flask):
        config.ensure_secret_key(app)
        return super().get_signing_serializer(app)


@migrate.configure
def _sqlite_folder(alembic_config):
    """`flask db upgrade` makes the folder of a SQLite database (the instance folder by
    default): nothing makes it at start-up."""
    url = make_url(current_app.config["SQLALCHEMY_DATABASE_URI"])
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    return alembic_config


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: settings from the environment, then `test_config` on top."""
    app = Flask(
        __name__,
        instance_path=str(config.instance_path()),
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
    )
    app.config.from_mapping(config.load_or_exit())
    if test_config:
        app.config.from_mapping(test_config)
    app.session_interface = _Sessions()
    if hops := app.config["PROXY_HOPS"]:  # the client's address and scheme, as proxies saw them
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)

    db.init_app(app)
    migrations = str(Path(__file__).parent / "migrations")
    migrate.init_app(app, db, directory=migrations, render_as_batch=True)
    csrf.init_app(app)
    login_manager.init_app(app)

    try:
        app.extensions["exportdesk.datasets"] = dataset_file.load(app.config["DATASETS_FILE"])
        app.extensions["exportdesk.datasets.typing"] = dataset_file.with_schema_kinds
    except DatasetFileError as exc:  # refuse to start, with the file's problems, no traceback
        raise SystemExit(f"exportdesk cannot start: {exc}") from None
    lanes.init_app(app)
    emails.init_app(app)

    app.register_blueprint(auth.bp)
    app.register_blueprint(account.bp)
    app.register_blueprint(exports.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(links.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(schedules.bp)
    app.register_blueprint(webhooks.bp)
    cli.init_app(app)
    _register_error_pages(app)
    headers.init_app(app)
    times.init_app(app)
    return app


def _register_error_pages(app: Flask) -> None:
    """Every error is a page (or JSON under /api), never a traceback."""

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return _error(400, "Your form expired or was not sent from this site. Please try again.")

    @app.errorhandler(DatasetFileError)
    def datasets_mismatch(exc: DatasetFileError):
        app.logger.error("%s", exc)
        return _error(503, "The datasets file does not match the source database; an admin "
                      "can see why with `flask datasets check`.")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _error(exc.code or 500, views.http_message(exc))

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        app.logger.exception("unhandled error")
        return _error(500, "Something went wrong on our side; it has been logged.")


def _error(status: int, message: str):
    if request.path.startswith("/api/"):
        return jsonify(error=message), status
    return render_template("error.html", status=status, message=message), status
