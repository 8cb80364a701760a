"""How the admin pages word things, once: audit actions in words, a checkpoint as labelled
fields (times and durations: webapp.times)."""

from __future__ import annotations

from flask import Flask

# An audit row's action (AdminAction.action) as a person says it; unknown ones are shown
# with their underscores replaced.
ACTIONS = {"cancel": "cancelled", "retry": "retried", "retry_from_scratch":
           "retried from scratch", "pause": "paused the lane", "resume": "resumed the lane",
           "org.create": "created the organisation", "org.key": "changed the data key",
           "user.invite": "invited", "user.reinvite": "invited again",
           "user.create": "created the user", "user.role": "changed the role",
           "user.disable": "disabled",
           "user.enable": "enabled", "user.move": "moved to another organisation"}


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
    """What the admin templates use beyond webapp.times: |action_words, checkpoint_fields."""
    app.add_template_filter(action_words, "action_words")
    app.jinja_env.globals.update(checkpoint_fields=checkpoint_fields)
