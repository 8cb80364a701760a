"""Signed tokens for the links we email or print: downloads bound to a job and its owner, password
resets, and invitations (the link `flask user create` prints)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from flask import current_app
from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer

from jobs.models import ExportJob, User, db
from webapp.config import ensure_secret_key

DOWNLOAD_SALT = "exportdesk.download-link"
RESET_SALT = "exportdesk.password-reset"
INVITATION_SALT = "exportdesk.invitation"


class InvalidToken(Exception):
    """Not a token we signed for this purpose (tampered, truncated, or used up)."""


class ExpiredToken(Exception):
    """A genuine token whose time is up."""


def _serializer(salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(ensure_secret_key(current_app), salt=salt)


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
    """Changes whenever the password does, so a reset or invitation token works once."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:20]


def _password_token(salt: str, user: User) -> str:
    return _serializer(salt).dumps({"user": user.id, "pw": _password_fingerprint(user)})


def _user_for_password_token(salt: str, token: str, setting: str) -> User:
    """The user a password token is for; InvalidToken once used (the password changed) or
    when the account is disabled, ExpiredToken after `setting` (a timedelta) has passed."""
    ttl = current_app.config[setting].total_seconds()
    payload, _signed, expired = _load(salt, token, ttl)
    if expired:
        raise ExpiredToken
    user_id = payload.get("user")
    user = db.session.get(User, user_id) if isinstance(user_id, int) else None
    if user is None or payload.get("pw") != _password_fingerprint(user) or not user.is_active:
        raise InvalidToken
    return user


def reset_token(user: User) -> str:
    return _password_token(RESET_SALT, user)


def user_for_reset_token(token: str) -> User:
    return _user_for_password_token(RESET_SALT, token, "PASSWORD_RESET_TTL")


def invitation_token(user: User) -> str:
    """A reset token by another name: it lives longer (INVITATION_TTL) and greets a newcomer."""
    return _password_token(INVITATION_SALT, user)


def user_for_invitation_token(token: str) -> User:
    return _user_for_password_token(INVITATION_SALT, token, "INVITATION_TTL")
