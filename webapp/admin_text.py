"""How the admin pages word things, once: times (one exact format, relative with the exact
one on hover), durations, audit actions in words, a checkpoint as labelled fields."""

from __future__ import annotations

from datetime import datetime

from flask import Flask
from markupsafe import Markup, escape

from jobs.models import utcnow

EXACT = "%Y-%m-%d %H:%M:%S UTC"
# An audit row's action (AdminAction.action) as a person says it; unknown ones are shown
# with their underscores replaced.
ACTIONS = {"cancel": "cancelled", "retry": "retried", "retry_from_scratch":
           "retried from scratch", "pause": "paused the lane", "resume": "resumed the lane",
           "org.create": "created the organisation", "org.key": "changed the data key",
           "user.invite": "invited", "user.create": "created the user",
           "user.role": "changed the role", "user.disable": "disabled",
           "user.enable": "enabled", "user.move": "moved to another organisation"}


def exact(moment: datetime | None) -> str:
    """The one format of a time on admin pages: 2026-12-02 13:04:05 UTC (naive UTC in)."""
    return moment.strftime(EXACT) if moment else "–"


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago, roughly: "just now", "3 min ago", "5 h ago", "2 days ago"."""
    if moment is None:
        return "–"
    seconds = ((now or utcnow()) - moment).total_seconds()
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


def duration(start: datetime | None, end: datetime | None) -> str:
    """How long something took: "under 1 s" rather than "0 s", else 42 s, 3 min 5 s, 2 h 4 min."""
    if start is None or end is None:
        return "–"
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return "under 1 s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def time_tag(moment: datetime | None, relative: bool = False) -> Markup:
    """A <time> element: the exact time (or, `relative`, how long ago) with the exact time
    on hover and as its machine-readable value."""
    if moment is None:
        return Markup("–")
    text = ago(moment) if relative else exact(moment)
    iso = moment.replace(microsecond=0).isoformat() + "Z"
    return Markup(f'<time datetime="{iso}" title="{escape(exact(moment))}">{escape(text)}'
                  "</time>")


def action_words(action: str) -> str:
    """An audit action in words: retry_from_scratch -> "retried from scratch"."""
    return ACTIONS.get(action, action.replace("_", " "))


def checkpoint_fields(checkpoint: dict | None) -> list[tuple[str, str]]:
    """A job's checkpoint as (label, value) pairs instead of its JSON."""
    if not checkpoint:
        return []
    key = checkpoint.get("last_key", checkpoint.get("key"))
    if isinstance(key, list):
        key = ", ".join(str(k) for k in key)
    fields = [("Rows", f"{checkpoint.get('rows', 0):,}"),
              ("Bytes", f"{checkpoint.get('bytes', 0):,}"),
              ("Last key", "–" if key is None else str(key)),
              ("Complete", "yes" if checkpoint.get("complete") else "no")]
    if checkpoint.get("part"):
        fields.append(("Part", str(checkpoint["part"])))
    return fields


def init_app(app: Flask) -> None:
    """The filters every admin template uses: |when (exact), |ago (relative), |took."""
    app.add_template_filter(lambda m: time_tag(m), "when")
    app.add_template_filter(lambda m: time_tag(m, relative=True), "ago")
    app.add_template_filter(action_words, "action_words")
    app.jinja_env.globals.update(duration=duration, checkpoint_fields=checkpoint_fields)
