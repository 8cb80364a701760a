"""Signed tokens for the links we email: downloads bound to a job and its owner, password resets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from flask import current_app
from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer

from jobs.models import ExportJob, User, db

DOWNLOAD_SALT = "exportdesk.download-link"
RESET_SALT = "exportdesk.password-reset"


class InvalidToken(Exception):
    """Not a token we signed for this purpose (tampered, truncated, or used up)."""


class ExpiredToken(Exception):
    """A genuine token whose time is up."""


def _serializer(salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=salt)


def _load(salt: str, token: str, max_age: float) -> tuple[dict, datetime, bool]:
    """Payload, signing time and whether it expired; InvalidToken unless we signed it."""
    serializer = _serializer(salt)
    try:
        payload, signed = serializer.loads(token, max_age=max_age, return_timestamp=True)
        expired = False
    except SignatureExpired as exc:
        try:
            payload, signed = serializer.load_payload(exc.payload), exc.date_signed
        except BadData:
            raise InvalidToken from None
        expired = True
    except BadData:
        raise InvalidToken from None
    if not isinstance(payload, dict) or signed is None:
        raise InvalidToken
    return payload, signed.replace(tzinfo=None), expired


@dataclass(frozen=True)
class DownloadGrant:
    """What a genuine download link names: this job's file, for its owner, signed then."""

    job_id: int
    user_id: int
    signed_at: datetime
    expired: bool


def download_token(job: ExportJob) -> str:
    return _serializer(DOWNLOAD_SALT).dumps({"job": job.id, "user": job.user_id})


def read_download_token(token: str) -> DownloadGrant:
    """The grant of a token we signed, expired or not (an expired one can still ask for
    a fresh link); InvalidToken for anything else."""
    ttl = current_app.config["DOWNLOAD_LINK_TTL"].total_seconds()
    payload, signed, expired = _load(DOWNLOAD_SALT, token, ttl)
    job_id, user_id = payload.get("job"), payload.get("user")
    if not isinstance(job_id, int) or not isinstance(user_id, int):
        raise InvalidToken
    return DownloadGrant(job_id, user_id, signed, expired)


def _password_fingerprint(user: User) -> str:
    """Changes whenever the password does, so a reset token works once."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:20]


def reset_token(user: User) -> str:
    return _serializer(RESET_SALT).dumps({"user": user.id, "pw": _password_fingerprint(user)})


def user_for_reset_token(token: str) -> User:
    """The user a reset token is for; InvalidToken once used (the password changed)."""
    ttl = current_app.config["PASSWORD_RESET_TTL"].total_seconds()
    payload, _signed, expired = _load(RESET_SALT, token, ttl)
    if expired:
        raise ExpiredToken
    user_id = payload.get("user")
    user = db.session.get(User, user_id) if isinstance(user_id, int) else None
    if user is None or payload.get("pw") != _password_fingerprint(user):
        raise InvalidToken
    return user
