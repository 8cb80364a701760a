"""Signals the core sends for the web app to answer, so the core never imports it (blinker,
as Flask's own signals)."""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

# Sent with `job=` (succeeded, or failed for good) by the worker, inside the transaction that
# records the end: a receiver adds its rows to that transaction (the owner's email), so the
# end and what it causes are saved together or not at all. Receivers must not commit.
export_finished = _signals.signal("export-finished")

# Sent with `schedule=` when a schedule pauses itself (failing runs, or it can no longer run),
# inside the transaction that records the pause: a receiver adds its rows (the owner's email).
schedule_paused = _signals.signal("schedule-paused")
