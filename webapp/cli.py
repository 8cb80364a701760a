"""Flask CLI: seed, worker, export, verify-files, datasets check, and `dev` (web plus one
consumer per lane); `org`, `user` and `token` are in webapp.people."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import TableClause, select
from sqlalchemy.exc import SQLAlchemyError

from jobs import dataset_check, dataset_file, datasets, lanes, source
from jobs.checkpoints import Checkpoint
from jobs.dataset_file import DatasetFileError
from jobs.datasets import InvalidParams, visible
from jobs.formats import FORMATS, stream
from jobs.models import ExportJob, JobState, db
from jobs.retention import verify
from jobs.storage import Part
from webapp import people, seed
from webapp.auth import find_user
from webapp.devserver import run_together


def init_app(app: Flask) -> None:
    for command in (seed_command, worker_command, export_command, verify_command,
                    dev_command, datasets_group, *people.GROUPS):
        app.cli.add_command(command)


@click.command("seed")
@click.option("--rows", default=100_000, show_default=True, help="How many transactions.")
@click.option("--if-empty", is_flag=True, help="Do nothing when users already exist.")
def seed_command(rows: int, if_empty: bool) -> None:
    """Demo organisations, users (with their dev passwords) and ROWS transactions."""
    if if_empty and seed.has_data():
        click.echo("Database already has data; not seeding.")
        return
    users = seed.seed(rows)
    click.echo(f"Seeded {rows} transactions and {rows // 4} orders. Users:")
    for email, password in users:
        click.echo(f"  {email}  password: {password}")


@click.command("worker")
@click.argument("lane_name", metavar="LANE", type=click.Choice(["critical", "exports"]))
def worker_command(lane_name: str) -> None:
    """Run a consumer for one lane, with that lane's settings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = current_app._get_current_object()
    for module in app.config["TASK_MODULES"]:
        importlib.import_module(module)  # an application's own tasks, declared on our lanes
    lane = lanes.LANES[lane_name]
    engine = db.engine

    def after_fork() -> None:
        engine.dispose(close=False)  # never share the parent's database connections
        for each in lanes.LANES.values():
            each.storage.after_fork()  # nor its queue connection (SQLite)

    os.register_at_fork(after_in_child=after_fork)
    click.echo(f"lane {lane_name}: {lane.settings} on {lane.storage.__class__.__name__}")
    lane.consumer().run()


@click.command("export")
@click.argument("dataset_name", metavar="DATASET")
@click.option("--user", "email", required=True, help="Export as this user (their organisation).")
@click.option("--param", "params", multiple=True, metavar="K=V", help="A dataset parameter.")
@click.option("--format", "fmt", default="csv", type=click.Choice(list(FORMATS)))
@click.option("--output", required=True, type=click.Path(dir_okay=False, writable=True))
def export_command(dataset_name: str, email: str, params: tuple[str, ...], fmt: str,
                   output: str) -> None:
    """Run an export inline with the same engine, scoped to the user's organisation."""
    folder = Path(output).resolve().parent
    if not folder.is_dir():  # said before any work, rather than a FileNotFoundError after it
        raise click.ClickException(f"the folder {folder} does not exist: create it, or choose "
                                   "another --output")
    user = find_user(email)
    if user is None:
        raise click.UsageError(f"no user {email!r}")
    dataset = datasets.get(dataset_name)
    if dataset is None or not dataset.allows(user.role):
        raise click.UsageError(f"unknown dataset {dataset_name!r}; choose "
                               f"{', '.join(sorted(visible(user)))}")
    raw = dict(p.split("=", 1) if "=" in p else (p, "") for p in params)
    try:
        cleaned = dataset.clean_params(raw)
    except InvalidParams as exc:
        raise click.UsageError(str(exc)) from None
    org_key = user.organisation.data_key_or_id
    with source.connect() as conn:
        total = conn.execute(dataset.count(org_key, cleaned)).scalar_one()
        with click.progressbar(length=total, label=f"{dataset_name} → {output}",
                               file=sys.stderr) as bar, Part.create(output) as out:
            done = [0]

            def advance(cp: Checkpoint) -> None:
                bar.update(cp.rows - done[0])
                done[0] = cp.rows

            result = stream(conn, dataset, org_key, cleaned, out, Checkpoint(), advance,
                            current_app.config["EXPORT_BATCH_ROWS"], 0.2, fmt,
                            current_app.config["CSV_BOM"])
    click.echo(f"{result.rows} rows, {result.bytes} bytes written to {output} "
               f"(SHA-256 {result.sha256})")


@click.command("verify-files")
@click.argument("job_ids", metavar="[JOB_ID]...", nargs=-1, type=int)
def verify_command(job_ids: tuple[int, ...]) -> None:
    """Check every succeeded export's file (or only these jobs'): present, of the recorded size
    and SHA-256. Prints one line per problem and a summary; exits 1 when a file is damaged."""

    checked = problems = undigested = 0
    last, seen = 0, set()
    while True:  # pages of jobs, each read in a short transaction: hashing takes its time
        where = [ExportJob.id > last]
        if job_ids:
            where.append(ExportJob.id.in_(job_ids))
        else:
            where += [ExportJob.state == JobState.SUCCEEDED, ExportJob.file_name.is_not(None)]
        jobs = db.session.scalars(select(ExportJob).where(*where).order_by(ExportJob.id)
                                  .limit(200)).all()
        db.session.close()  # detached, with what was read
        if not jobs:
            break
        last = jobs[-1].id
        seen.update(job.id for job in jobs)
        for job in jobs:
            if job.state != JobState.SUCCEEDED or not job.file_name:
                click.echo(f"job {job.id}: no file to check ({job.state})")
                problems += 1
                continue
            problem = verify(job)
            if problem:
                now = db.session.get(ExportJob, job.id)  # expired or changed meanwhile?
                current = (now.state, now.file_name) if now else None
                db.session.close()
                if current != (JobState.SUCCEEDED, job.file_name):
                    continue
                click.echo(problem)
                problems += 1
            elif job.sha256 is None:
                click.echo(f"job {job.id}: {job.file_name}: no digest recorded (size checked)")
                undigested += 1
            checked += 1
    for unknown in sorted(set(job_ids) - seen):
        click.echo(f"job {unknown}: no such job")
        problems += 1
    summary = f"checked {checked} files, {problems} problems"
    click.echo(summary + (f", {undigested} without a digest" if undigested else ""))
    if problems:
        raise SystemExit(1)


@click.command("dev")
@click.option("--port", envvar="PORT", default=5000, show_default=True)
def dev_command(port: int) -> None:
    """Run the web app and one consumer per lane together; Ctrl-C stops them all."""
    os.environ["PORT"] = str(port)  # all three read it: BASE_URL, when unset, follows it
    flask = [sys.executable, "-m", "flask"]
    root = Path(__file__).resolve().parent.parent
    sys.exit(run_together(
        {
            "web": [*flask, "run", "--host", "127.0.0.1", "--port", str(port)],
            "critical": [*flask, "worker", "critical"],
            "exports": [*flask, "worker", "exports"],
        },
        cwd=root,
    ))


@click.group("datasets", cls=AppGroup)
def datasets_group() -> None:
    """The datasets file (DATASETS_FILE): what can be exported."""


@datasets_group.command("check")
def datasets_check_command() -> None:
    """Hold every dataset against the source database; exit 1 on any problem.

    (A file that cannot be read, or a field that is wrong, stops every command before this
    one, with the file, the dataset and the field named.)"""
    problems = 0
    for declared in datasets.declared().values():
        try:
            dataset = dataset_file.with_schema_kinds(declared) if declared.undeclared else declared
        except DatasetFileError as exc:
            failed = exc.problems
        except SQLAlchemyError as exc:
            failed = [f"the kinds of {', '.join(declared.undeclared)} cannot be read from the "
                      f"source: {dataset_check.first_line(exc)}"]
        else:
            failed = []
        if failed:
            click.echo(f"{declared.name}: {len(failed)} problem(s)")
            click.echo("".join(f"  PROBLEM {line}\n" for line in failed), nl=False)
            problems += len(failed)
            continue
        report = dataset_check.check(dataset, source.engine())
        where = (f"table {dataset.table.fullname}" if isinstance(dataset.table, TableClause)
                 else "sql")
        scope = f"tenant {dataset.tenant}" if dataset.tenant else "scope all (admins only)"
        state = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
        click.echo(f"{dataset.name} ({where}, {scope}): {state}")
        for line in report.lines:
            click.echo(f"  {line}")
        for problem in report.problems:
            click.echo(f"  PROBLEM {problem}")
        problems += len(report.problems)
    file = current_app.config["DATASETS_FILE"] or "the demo's datasets"
    click.echo(f"{len(datasets.declared())} dataset(s) in {file}: "
               f"{problems or 'no'} problem(s)")
    if problems:
        sys.exit(1)
