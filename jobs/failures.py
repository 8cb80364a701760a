"""Why an attempt failed: transient (retried), permanent (failed at once), in words a user reads."""

from __future__ import annotations

import errno
import os

from huey.exceptions import TaskTimeout
from redis import exceptions as redis_exc
from sqlalchemy import exc as sa_exc

from jobs import source
from jobs.csvrows import BadValue
from jobs.dataset_file import DatasetFileError
from jobs.datasets import InvalidParams
from jobs.formats import TooManyRows
from jobs.storage import StorageRefused, TooLarge


class PermanentFailure(Exception):
    """Retrying cannot help (bad parameters, a dataset that is gone): fail at once, say why."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # includes refused and reset connections
    TimeoutError,
    TaskTimeout,
    sa_exc.OperationalError,  # lost or refused database connection, lock and statement timeouts
    sa_exc.TimeoutError,  # no connection free in the pool
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                  errno.ENOTDIR, errno.EISDIR}


def is_permanent(exc: BaseException) -> bool:
    """Also a statement past the source's time limit (the same query would run as long again)
    and a value that cannot be exported (the same rows would hold it again)."""
    return (isinstance(exc, InvalidParams | PermanentFailure | TooManyRows | BadValue
                       | DatasetFileError | sa_exc.DataError | StorageRefused | TooLarge)
            or source.timed_out(exc))


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, TRANSIENT_ERRORS)


def reason(exc: BaseException) -> str:
    """A one-line reason a user can read (SQLAlchemy appends SQL and links on later lines)."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, InvalidParams):
        return f"Invalid parameters: {first}"
    if isinstance(exc, PermanentFailure | TooManyRows | DatasetFileError | StorageRefused
                  | TooLarge):
        return first
    if isinstance(exc, BadValue | sa_exc.DataError):  # the database's words, without its class
        words = str(exc.orig if isinstance(exc, sa_exc.DataError) else exc).strip()
        return f"A value cannot be exported: {(words.splitlines() or [''])[0][:300]}"
    if source.timed_out(exc):
        return ("The query ran past the source database's statement timeout "
                "(SOURCE_STATEMENT_TIMEOUT): narrow the filters, or ask an operator to index "
                "the dataset's key and filter columns or to raise the limit.")
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"Storage error: {os.strerror(exc.errno)}{where}"
    if isinstance(exc, TaskTimeout):
        return f"TaskTimeout: the attempt ran past the lane's hard limit ({first})"
    if is_transient(exc):
        return f"Temporary failure ({type(exc).__name__}): {first}"
    return f"{type(exc).__name__}: {first}"


class AttemptFailed(Exception):
    """An attempt ended in error; `retry` says whether the job goes back on its lane."""

    def __init__(self, error: str, retry: bool, attempt: int = 1):
        super().__init__(error)
        self.retry = retry
        self.attempt = attempt


def caused_by(exc: BaseException | None, kind: type) -> BaseException | None:
    """The `kind` exception behind exc, also when a driver wrapped it (SQLAlchemy does)."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return None
