"""The Flask side of exportdesk: app factory, login, export pages, JSON API and CLI."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flask import Flask, jsonify, render_template, request
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_wtf.csrf import CSRFError, CSRFProtect
from sqlalchemy import event
from sqlalchemy.engine import Engine
from werkzeug.exceptions import HTTPException

from webapp import config
from webapp.models import db

ROOT = Path(__file__).resolve().parent.parent
csrf = CSRFProtect()
login_manager = LoginManager()
migrate = Migrate()


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """Web, consumers and workers share SQLite files: WAL lets readers run beside one writer."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: settings from the environment, then `test_config` on top."""
    app = Flask(
        __name__,
        instance_path=str(config.instance_path()),
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
    )
    app.config.from_mapping(config.load())
    if test_config:
        app.config.from_mapping(test_config)

    db.init_app(app)
    migrations = str(Path(__file__).parent / "migrations")
    migrate.init_app(app, db, directory=migrations, render_as_batch=True)
    csrf.init_app(app)
    login_manager.init_app(app)

    from jobs import lanes

    lanes.configure(app.config["BROKER_URL"], Path(app.instance_path))

    from webapp import admin, api, auth, cli, exports, links, ops

    app.register_blueprint(auth.bp)
    app.register_blueprint(exports.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(links.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ops.bp)
    cli.init_app(app)
    _register_error_pages(app)
    return app


def _register_error_pages(app: Flask) -> None:
    """Every error is a page (or JSON under /api), never a traceback."""

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return _error(400, "Your form expired or was not sent from this site. Please try again.")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        app.logger.exception("unhandled error")
        return _error(500, "Something went wrong on our side; it has been logged.")


def _error(status: int, message: str):
    if request.path.startswith("/api/"):
        return jsonify(error=message), status
    return render_template("error.html", status=status, message=message), status
