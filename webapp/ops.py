"""For load balancers, Prometheus and browsers: /healthz, /metrics and /favicon.ico."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, redirect, url_for
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from sqlalchemy import case, extract, func, select, text

from jobs import dispatch, retention
from jobs.models import ExportJob, JobAttempt, db

bp = Blueprint("ops", __name__)
# Upper bounds (seconds) of the attempt duration histogram: emails to long exports.
BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)


@bp.get("/favicon.ico")
def favicon():
    """Browsers and tools ask for /favicon.ico whatever the page links: send them to the icon,
    rather than log a 404 for every page."""
    return redirect(url_for("static", filename="favicon.svg"), 301)


@bp.get("/healthz")
def healthz():
    """200 when the database answers, 503 otherwise; nothing else is checked (lanes have
    their own metrics), so a slow broker does not take the web servers out of rotation."""
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as exc:
        db.session.rollback()
        return jsonify(status="unavailable", database=type(exc).__name__), 503
    return jsonify(status="ok")


def _seconds(start, end):
    """An interval in seconds, in SQL, for SQLite and PostgreSQL."""
    if db.session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return extract("epoch", end - start)


class Collector:
    """Everything is read at scrape time: lane health through jobs.dispatch.lane_health(), and
    attempt counts and durations from job_attempts (all finished attempts, so the counters only
    grow, as Prometheus expects, except when jobs are deleted)."""

    def collect(self):
        health = dispatch.lane_health()
        gauges = {
            "depth": ("exportdesk_lane_depth", "Tasks waiting in the lane's queue."),
            "oldest_wait": ("exportdesk_lane_oldest_wait_seconds",
                            "Age of the oldest waiting task."),
            "running": ("exportdesk_lane_running", "Tasks running now."),
            "consumers": ("exportdesk_lane_consumers", "Consumers alive by heartbeat."),
            "workers": ("exportdesk_lane_workers", "Workers of the live consumers."),
            "paused": ("exportdesk_lane_paused", "1 while an admin has paused the lane."),
        }
        for key, (name, doc) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["lane"])
            for lane in health:
                family.add_metric([lane["lane"]], float(lane[key]))
            yield family
        hour = GaugeMetricFamily(
            "exportdesk_lane_tasks_last_hour",
            "Tasks the lane finished in the last 60 minutes (a sliding window, from the lane's "
            "per-minute ledger), by outcome.", labels=["lane", "outcome"])
        for lane in health:
            hour.add_metric([lane["lane"], "completed"], sum(m[1] for m in lane["minutes"]))
            hour.add_metric([lane["lane"], "failed"], sum(m[2] for m in lane["minutes"]))
        yield hour
        disk = retention.disk()
        yield GaugeMetricFamily("exportdesk_export_disk_bytes",
                                "Bytes held by export files and parts.", value=disk.used)
        if disk.free is not None:  # a bucket has no disk to fill
            yield GaugeMetricFamily("exportdesk_export_disk_free_bytes",
                                    "Bytes still free on the export folder's disk.",
                                    value=disk.free)
        yield from self._attempts()

    def _attempts(self):
        seconds = _seconds(JobAttempt.started_at, JobAttempt.finished_at)
        finished = JobAttempt.finished_at.is_not(None)
        counts = db.session.execute(
            select(ExportJob.lane, JobAttempt.outcome, func.count())
            .join(ExportJob, ExportJob.id == JobAttempt.job_id).where(finished)
            .group_by(ExportJob.lane, JobAttempt.outcome)
        ).all()
        total = CounterMetricFamily("exportdesk_job_attempts",
                                    "Finished job attempts by lane and outcome.",
                                    labels=["lane", "outcome"])
        for lane, outcome, count in counts:
            total.add_metric([lane, outcome or "unknown"], count)
        yield total
        columns = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in BUCKETS]
        rows = db.session.execute(
            select(ExportJob.lane, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
            .join(ExportJob, ExportJob.id == JobAttempt.job_id).where(finished)
            .group_by(ExportJob.lane)
        ).all()
        db.session.rollback()
        histogram = HistogramMetricFamily(
            "exportdesk_job_attempt_duration_seconds",
            "Durations of finished job attempts (start to end, any outcome), computed from "
            "job_attempts at scrape time.", labels=["lane"])
        for lane, count, total_seconds, *cumulative in rows:
            buckets = [(str(b), float(c or 0)) for b, c in zip(BUCKETS, cumulative, strict=True)]
            buckets.append(("+Inf", float(count)))
            histogram.add_metric([lane], buckets, float(total_seconds or 0.0))
        yield histogram


@bp.get("/metrics")
def metrics():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
