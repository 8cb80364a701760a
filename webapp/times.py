"""How every page says a time, once: one exact format (2026-12-02 13:04:05 UTC), relative
where it helps ("3 min ago", the exact time on hover), one way to say a length of time."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Flask
from markupsafe import Markup, escape

from jobs.models import utcnow

EXACT = "%Y-%m-%d %H:%M:%S UTC"


def naive_utc(moment: datetime) -> datetime:
    """The database's times are naive UTC; an aware one is brought to that."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def iso_time(moment: datetime) -> str:
    """A UTC time for `<time datetime>`: ISO 8601 with a Z and at most milliseconds (HTML
    allows no more than three fractional digits; isoformat() gives six)."""
    moment = naive_utc(moment)
    return moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds") + "Z"


def exact(moment: datetime | None) -> str:
    """The one format of a time: 2026-12-02 13:04:05 UTC."""
    return naive_utc(moment).strftime(EXACT) if moment else "–"


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago, roughly: "just now", "3 min ago", "5 h ago", "2 days ago"."""
    if moment is None:
        return "–"
    seconds = ((now or utcnow()) - naive_utc(moment)).total_seconds()
    if seconds < 0:
        return "just now" if seconds > -60 else f"in {span(-seconds)}"
    return "just now" if seconds < 10 else f"{span(seconds)} ago"


def span(seconds: float) -> str:
    """A length of time in its largest unit: 42 s, 3 min, 5 h, 2 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            value = int(seconds // size)
            return f"{value} {'day' if unit == 'days' and value == 1 else unit}"
    return f"{int(seconds)} s"


def seconds_text(seconds: float | None) -> str:
    """A length of time as a person says it: under 1 s (never "0 s", which reads as if nothing
    was done), 4 s, 2 min 05 s, 1 h 12 min (a live count keeps its width)."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return "under 1 s"
    total = int(round(seconds))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} min"


def duration(start: datetime | None, end: datetime | None) -> str:
    """How long something took, from its start to its end."""
    if start is None or end is None:
        return "–"
    return seconds_text((end - start).total_seconds())


def time_tag(moment: datetime | None, relative: bool = False, missing: str = "–") -> Markup:
    """A <time> element: the exact time (or, `relative`, how long ago) with the exact time
    on hover and as its machine-readable value."""
    if moment is None:
        return Markup(escape(missing))
    text = ago(moment) if relative else exact(moment)
    whole = iso_time(moment.replace(microsecond=0))  # to the second, as shown
    return Markup(f'<time datetime="{whole}" title="{escape(exact(moment))}">'
                  f"{escape(text)}</time>")


def init_app(app: Flask) -> None:
    """The filters every template uses: |when (exact), |ago (relative), |exact (plain text),
    |duration (seconds), |iso_time; and duration(start, end)."""
    app.add_template_filter(lambda m, missing="–": time_tag(m, missing=missing), "when")
    app.add_template_filter(lambda m, missing="–": time_tag(m, True, missing), "ago")
    app.add_template_filter(exact, "exact")  # where no markup goes (emails)
    app.add_template_filter(seconds_text, "duration")
    app.add_template_filter(iso_time, "iso_time")
    app.jinja_env.globals.update(duration=duration)
