"""Checkpoints: how far a part is known good, recorded only once durable; fault injection."""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from flask import current_app, has_app_context

from jobs.storage import Part

log = logging.getLogger(__name__)
# Where the rows stand, before any is written: the fields a resume starts from.
FIRST_ROW = {"last_key": None, "rows": 0, "bytes": 0, "replaced": 0, "truncated": 0}


@dataclass
class Checkpoint:
    """How far a part file is known to be good: on disk (fsynced) and recorded in the job row.

    `part` names the claim's part file that holds the `bytes` bytes, `sha256` is their digest
    (a resume checks both before writing on), and `complete` says every row is in them: the
    export only needs publishing. `replaced` counts the values written with invalid UTF-8
    replaced and `truncated` the texts cut to fit an xlsx cell, in those rows: a resume counts
    on from them, and the job page shows them (docs/data-quality.md).
    """

    last_key: object = None
    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    part: str | None = None
    complete: bool = False
    replaced: int = 0
    truncated: int = 0
    upload: dict | None = None

    @classmethod
    def from_json(cls, data: dict | None) -> Checkpoint:
        return cls(**data) if data else cls()

    def resume_point(self) -> Checkpoint:
        """Where a resume writes from: here, or for a bucket's unfinished upload the position
        its `from` records (the last part ends past it; those bytes are written again and
        skipped), the first row when it records none."""
        if self.complete or self.upload is None:
            return self
        return replace(self, **(self.upload["from"] or FIRST_ROW), sha256="")


_faults_seen: Counter = Counter()


def fault(step: str) -> None:
    """Tests only: SIGKILL this worker's process group at the step FAULT_INJECT names.

    FAULT_INJECT is "step" or "step:n" (the n-th time this process reaches it). Steps, in the
    order an export meets them: written (bytes written, not yet fsynced), synced (fsynced, the
    checkpoint not yet committed), checkpointed (committed), final (the last bytes fsynced,
    the final checkpoint not yet committed), published (the file renamed into place, the job
    not yet marked succeeded), committed (marked succeeded, the email not yet handed to its
    lane); and ended_stopped (a claim ended a cancelled attempt whose worker went silent, not
    yet committed); webhook_sent (an endpoint answered, the delivery not yet recorded).
    Refused in production (webapp.config).
    """
    spec = current_app.config.get("FAULT_INJECT", "") if has_app_context() else ""
    name, _, nth = spec.partition(":")
    if name != step:
        return
    _faults_seen[step] += 1
    if _faults_seen[step] >= int(nth or 1):
        log.warning("FAULT_INJECT: killing this consumer at step %r", spec)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def record_checkpoint(out: Part, position: Checkpoint,
                      on_checkpoint: Callable[[Checkpoint], None], complete: bool = False) -> None:
    """Fsync (or upload), then record: a checkpoint never counts a byte that is not durable."""
    fault("written")
    out.sync(final=complete)
    fault("final" if complete else "synced")
    position.bytes, position.sha256 = out.size, out.sha256
    position.part, position.complete = out.name, complete
    position.upload = out.upload_state({key: getattr(position, key) for key in FIRST_ROW})
    on_checkpoint(replace(position))
    fault("checkpointed")

