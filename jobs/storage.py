"""Where export files live: one small interface (`Storage`) with two backends, a local folder
(the default) and an S3-compatible bucket (`jobs.s3_storage`); `storage()` picks one as the
configuration says, and nothing else knows which.

Every claim of a job (attempt number N) writes only files of its own: the part
`job-<id>.a<N>.<fmt>.part`, published by a rename to `job-<id>.a<N>.<fmt>`. A worker that lost
its claim (paused past its lease) can therefore never write into a file another claim resumes
or publishes: its open handle points at a part nobody reads. A resume copies the previous
claim's part, verified against the checkpoint's length and SHA-256, into a part of its own; a
part is never extended, and a published file is never replaced. (In a bucket a part is a
multipart upload, resumed in place: `jobs.s3_storage` says how it is fenced.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flask import current_app

CHUNK = 1 << 20
OUR_FILE = re.compile(r"job-(\d+)\.(?:a\d+\.)?[\w.]+?(\.part)?")


class TooLarge(Exception):
    """The export outgrows what its storage can hold in one file: retrying cannot help."""


class PartsChanged(Exception):
    """A resume rewrote bytes a bucket's uploaded parts hold, and they differ: the export must
    start over (its checkpoint cannot be resumed)."""


class StorageRefused(Exception):
    """The storage refuses writes for good (a bucket's AccessDenied, a bucket that is gone):
    retrying the same write fails the same way."""


@dataclass(frozen=True)
class Prefix:
    """The bytes a resume may keep: the first `size` bytes of the part `name`, whose SHA-256
    is `sha256` (what the checkpoint recorded); `upload` is a bucket's record of the parts it
    already holds (None for a local file)."""

    name: str
    size: int
    sha256: str
    upload: dict | None = None


class Part:
    """A claim's own part file, open for appending; every byte written is counted and hashed,
    so the file's SHA-256 is known when it is finished, without reading it again.

    It has no `tell` or `seek` on purpose: a zip writer (xlsx) then streams its entries
    instead of seeking back to patch headers, so what it writes is what gets hashed."""

    def __init__(self, fh: BinaryIO, name: str, hasher, size: int):
        self._fh, self.name, self._hasher, self.size = fh, name, hasher, size

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self._hasher.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._fh.flush()

    def sync(self, final: bool = False) -> None:
        """Flush and fsync: after this, `size` bytes are on disk (`final`, the last ones,
        matters only to a bucket)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def checkpoint_due(self, elapsed: float, interval: float) -> bool:
        """Whether the writer checkpoints now, `elapsed` seconds after its last checkpoint: a
        file, every `interval` seconds (a bucket's part, at its upload's part boundaries)."""
        return elapsed >= interval

    def upload_state(self, position: dict) -> dict | None:
        """What a resume on another host needs beyond the checkpoint at `position`: nothing
        for a local file (a bucket's part records its upload)."""
        return None

    @classmethod
    def create(cls, path: str | os.PathLike) -> Part:
        """A new, empty file at `path` (e.g. `flask export --output`)."""
        return cls(open(path, "wb"), Path(path).name, hashlib.sha256(), 0)  # noqa: SIM115

    @property
    def sha256(self) -> str:
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Part:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Storage:
    """What every backend gives: a claim's part opened at a verified prefix, published, read
    (with ranges), listed and deleted; files are named only by job id, attempt and format,
    never by request input."""

    @staticmethod
    def part_name(job_id: int, attempt: int, fmt: str) -> str:
        return f"job-{int(job_id)}.a{int(attempt)}.{fmt}.part"

    @staticmethod
    def final_name(part_name: str) -> str:
        return part_name.removesuffix(".part")

    @staticmethod
    def checked(name: str) -> str:
        """`name` when it is a file name of ours (else ValueError): nothing else is opened."""
        if "/" in name or "\\" in name or name.startswith(".") or not OUR_FILE.fullmatch(name):
            raise ValueError(f"not a file name of ours: {name!r}")
        return name

    def open_part(self, job_id: int, attempt: int, fmt: str,
                  keep: Prefix | None = None) -> tuple[Part, str | None]:
        """A part for this claim holding the verified prefix `keep` if there is one, and why
        not when it cannot (then it starts empty)."""
        raise NotImplementedError

    def publish(self, part: Part) -> str:
        """Make a finished part the published file; returns its name."""
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        """The published file `name` for reading, seekable (a download's ranges)."""
        raise NotImplementedError

    def size(self, name: str) -> int:
        """The size of the published file `name`; FileNotFoundError when there is none."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove the file or part `name`, if it is there."""
        raise NotImplementedError

    def entries(self) -> list[tuple[str, int, float]]:
        """Every file and part as (name, size, modified time): for retention and disk use."""
        raise NotImplementedError

    def free_bytes(self) -> tuple[int, int] | None:
        """(free, total) bytes of the disk the files are on; None when no disk limits them."""
        raise NotImplementedError

    def download_url(self, name: str, filename: str, mimetype: str) -> str | None:
        """A short-lived address the browser fetches the file from itself (the app has
        checked who asks), or None when the app sends the file."""
        return None

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except FileNotFoundError:
            return False
        return True

    def sha256(self, name: str) -> str:
        """The SHA-256 (hex) of the file `name`, read 1 MiB at a time."""
        hasher = hashlib.sha256()
        with self.open(name) as fh:
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()

    def verify(self, name: str, size: int, sha256: str) -> bool:
        """True when the file `name` holds exactly `size` bytes whose SHA-256 is `sha256`."""
        try:
            return self.size(name) == size and self.sha256(name) == sha256
        except FileNotFoundError:
            return False

    def parts(self, job_id: int) -> list[str]:
        """The names of a job's parts (of any claim)."""
        prefix = f"job-{int(job_id)}."
        return [name for name, _size, _mtime in self.entries()
                if name.startswith(prefix) and name.endswith(".part")]

    def discard_parts(self, job_id: int, keep: str | None = None) -> None:
        """Remove a job's parts, but `keep`."""
        for name in self.parts(job_id):
            if name != keep:
                self.delete(name)

    def parts_bytes(self, job_id: int | None = None) -> int:
        """Bytes held by parts (of running exports and those kept for a retry), or by one
        job's."""
        prefix = "job-" if job_id is None else f"job-{int(job_id)}."
        return sum(size for name, size, _mtime in self.entries()
                   if name.startswith(prefix) and name.endswith(".part"))


class LocalStorage(Storage):
    """Export files in one folder (EXPORT_DIR)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        return self.root / self.checked(name)

    def open_part(self, job_id: int, attempt: int, fmt: str,
                  keep: Prefix | None = None) -> tuple[Part, str | None]:
        """A new part for this claim, holding the verified prefix `keep` if there is one.

        The prefix is copied from its part and hashed on the way; when that part is missing,
        shorter than the prefix or its bytes differ, the new part starts empty and the second
        value says why (for the attempt's record). The caller removes the job's other parts
        (`discard_parts`) once its checkpoint names the new one.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        name = self.part_name(job_id, attempt, fmt)
        fh = open(self._path(name), "w+b")  # noqa: SIM115 (the Part closes it)
        hasher, size, note = hashlib.sha256(), 0, None
        if keep is not None and keep.size > 0:
            note = self._copy_prefix(keep, fh, hasher)
            if note is None:
                size = keep.size
            else:
                fh.seek(0)
                fh.truncate(0)
                hasher = hashlib.sha256()
        return Part(fh, name, hasher, size), note

    def _copy_prefix(self, keep: Prefix, out: BinaryIO, hasher) -> str | None:
        """Copy and hash the first keep.size bytes of keep.name into out; why not, or None."""
        try:
            src = open(self._path(keep.name), "rb")  # noqa: SIM115
        except FileNotFoundError:
            return f"the checkpoint's part {keep.name} is missing"
        with src:
            left = keep.size
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    return (f"the checkpoint's part {keep.name} holds {keep.size - left:,} bytes,"
                            f" fewer than the {keep.size:,} it recorded")
                out.write(chunk)
                hasher.update(chunk)
                left -= len(chunk)
        if hasher.hexdigest() != keep.sha256:
            return f"the first {keep.size:,} bytes of {keep.name} differ from the checkpoint's"
        return None

    def publish(self, part: Part) -> str:
        """Move a finished (synced, closed) part to its final name; returns that name.

        The final name is the part's own (one per claim), so a publish never replaces a file
        another claim published. The directory is synced, so the rename survives a crash."""
        final = self.final_name(part.name)
        os.rename(self._path(part.name), self._path(final))
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")  # noqa: SIM115 (the response closes it)

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, int, float]]:
        """Every file in the folder as (name, size, modified time): for retention and disk use."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while we looked
                continue
            if path.is_file():
                found.append((path.name, stat.st_size, stat.st_mtime))
        return found

    def free_bytes(self) -> tuple[int, int] | None:
        """(free, total) bytes of the disk the folder is on."""
        self.root.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(self.root)
        return usage.free, usage.total


def storage() -> Storage:
    """The app's export storage, as its configuration says: the bucket STORAGE_URL names, else
    the folder EXPORT_DIR."""
    url = current_app.config.get("STORAGE_URL", "")
    if url:
        from jobs.s3_storage import S3Storage  # boto3 is imported only where a bucket is used

        return S3Storage.from_config(url, current_app.config)
    return LocalStorage(current_app.config["EXPORT_DIR"])
