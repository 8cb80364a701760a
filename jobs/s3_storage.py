"""Export files in an S3-compatible bucket (STORAGE_URL=s3://bucket/prefix): a claim's part is
a multipart upload, and its checkpoints are the upload's completed parts.

Every part but the last is S3_PART_SIZE bytes (R2 requires equal parts; S3 wants 5 MiB at
least and 10,000 parts at most, so one file holds at most 10,000 × S3_PART_SIZE bytes: 156 GiB
at the default 16 MiB; a larger export fails saying so). The writer checkpoints when a part
boundary has been crossed (`UploadPart.checkpoint_due`): at a row boundary, so the bytes past
the last full part are not in the bucket yet. The checkpoint therefore records, beside the
uploaded parts' ETags, the previous checkpoint's position (`from`), which lies inside them: a
resume on any host lists the upload's parts, checks them against the ETags, starts writing
again from `from` and skips the bytes the parts already hold (checked against their recorded
digest, `skip_sha256`), so the object is the one an uninterrupted export makes. (csv.gz
closes a gzip member at each checkpoint, so its members may end elsewhere after a resume; its
uncompressed bytes are the same.)

A resume continues the upload of an earlier claim (an upload cannot be copied), so the fence
is the upload itself: CompleteMultipartUpload names every part's ETag, so a part a stale
worker overwrote with other bytes fails the publish, and an upload completes once only. The
SHA-256 of a resumed upload's bytes is not known to the resuming worker (a hash state cannot be
saved): it is read back once, after the publish (`jobs.engine`).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import quote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from jobs.behind import OneBehind
from jobs.storage import OUR_FILE, Part, PartsChanged, Prefix, Storage, StorageRefused, TooLarge

MAX_PARTS = 10_000  # S3's most parts in one upload
# Errors a retry would meet again: the job fails at once, saying which.
REFUSALS = {"AccessDenied", "AllAccessDisabled", "NoSuchBucket", "InvalidAccessKeyId",
            "SignatureDoesNotMatch", "AccountProblem", "InvalidBucketName", "InvalidBucketState",
            "MethodNotAllowed", "EntityTooLarge", "EntityTooSmall"}
_clients: dict[tuple[int, str], object] = {}


def client(endpoint: str):
    """One boto3 client per process and endpoint (a forked worker makes its own). Region and
    credentials come from the standard AWS variables; checksums only where an operation
    requires them, which S3-compatible servers accept."""
    key = (os.getpid(), endpoint)
    if key not in _clients:
        config = Config(request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"mode": "standard"}, signature_version="s3v4",
                        s3={"addressing_style": "path"} if endpoint else None)
        _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                                       config=config)
    return _clients[key]


def content_disposition(filename: str) -> str:
    """An attachment named `filename`, also when it is not ASCII (RFC 6266)."""
    plain = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename)}"


class UploadPart(Part):
    """A claim's part in the bucket: bytes are buffered and uploaded a full part at a time, as
    they come, in a thread of its own while the next rows are written (`jobs.behind`: one part
    in flight, so memory holds two); `sync` waits for it, `sync(final=True)` uploads the last,
    shorter one.

    A resume writes again the bytes from the checkpoint's `from` position up to the end of the
    uploaded parts (`durable`): they are counted and hashed, not uploaded, and must hash to the
    checkpoint's `skip_sha256`, else the rows changed since (an update in the source) and the
    part's bytes would not join the new ones: PartsChanged. `skip_sha256` is kept up to date
    for the next checkpoint by hashing, from the last checkpoint's position on, every byte that
    is skipped or uploaded."""

    def __init__(self, store: S3Storage, name: str, upload_id: str, etags: list[str],
                 size: int, durable: int, hasher, resume_from: dict | None,
                 skip_sha256: str = ""):
        self._store, self.name, self.upload_id = store, name, upload_id
        self.etags, self.size, self._durable, self._hasher = etags, size, durable, hasher
        self._from, self._checkpointed = resume_from, size
        self._skip_end, self._skip_sha256 = durable, skip_sha256
        self._since, self._since_from = hashlib.sha256(), size  # bytes from the last checkpoint
        self._buffer = bytearray()
        self._behind = OneBehind("upload")

    def write(self, data: bytes) -> int:
        if self._hasher is not None:
            self._hasher.update(data)
        start, self.size = self.size, self.size + len(data)
        view = memoryview(data)
        if start < self._skip_end:  # a resume's bytes that the uploaded parts already hold
            self._since.update(view[:self._skip_end - start])
            if self.size >= self._skip_end:
                self._check_skipped()
        if self.size > self._durable:
            self._buffer += view[max(0, self._durable - start):]
            step = self._store.part_size
            while len(self._buffer) >= step:
                self._behind.submit(self._upload, bytes(self._buffer[:step]))
                del self._buffer[:step]
        return len(data)

    def _check_skipped(self) -> None:
        if self._since.hexdigest() != self._skip_sha256:
            raise PartsChanged(
                f"the rows written again from the checkpoint of {self.name} differ from those "
                "in its uploaded parts (the source changed since): starting over")

    def _upload(self, data: bytes) -> None:
        number = len(self.etags) + 1
        if number > MAX_PARTS:
            step = self._store.part_size
            raise TooLarge(f"This export is larger than {MAX_PARTS:,} parts of "
                           f"{step / 2**20:g} MiB ({MAX_PARTS * step / 2**30:,.0f} GiB), the "
                           "most one file in the bucket holds: narrow the filters, or ask an "
                           "operator to raise S3_PART_SIZE.")
        self.etags.append(self._store.upload_part(self, number, data))
        self._since.update(memoryview(data)[max(0, self._since_from - self._durable):])
        self._durable += len(data)

    def flush(self) -> None:
        """Nothing to do: a part is uploaded as soon as it is full."""

    def sync(self, final: bool = False) -> None:
        """Every full part is uploaded already; `final` uploads the rest as the last part
        (after checking that a resume wrote again all the uploaded parts hold)."""
        self._behind.wait()
        if final and self.size < self._skip_end:
            self._check_skipped()
        if final and self._buffer:
            self._upload(bytes(self._buffer))
            self._buffer.clear()

    def checkpoint_due(self, elapsed: float, interval: float) -> bool:
        """Past the next part boundary since the last checkpoint (and past what a resume
        skips): a checkpoint's parts then always reach beyond the previous checkpoint."""
        step = self._store.part_size
        return self.size >= max((self._checkpointed // step + 1) * step, self._durable)

    def upload_state(self, position: dict) -> dict:
        """The upload, its parts' ETags, where a resume writes from (the previous checkpoint's
        position) and the digest of the uploaded bytes past it; `position` becomes the next
        one's `from`."""
        skipped = self._skip_sha256 if self.size < self._skip_end else self._since.hexdigest()
        state = {"id": self.upload_id, "part_size": self._store.part_size,
                 "etags": list(self.etags), "from": self._from, "skip_sha256": skipped}
        if self.size >= self._skip_end:  # (a resume's first record changes nothing)
            self._from, self._checkpointed = position, self.size
            self._since, self._since_from = hashlib.sha256(), self.size
        return state

    @property
    def sha256(self) -> str:
        """The digest of every byte, or "" when the part was resumed (not all passed here)."""
        return self._hasher.hexdigest() if self._hasher is not None else ""

    def close(self) -> None:
        """Nothing uploads after this (the part in flight is finished first)."""
        self._behind.close()
        self._buffer.clear()


class S3Object(io.RawIOBase):
    """A published object for reading, seekable: a read after a seek starts a ranged GET."""

    def __init__(self, store: S3Storage, key: str, size: int):
        super().__init__()
        self._store, self._key, self._size, self._pos, self._body = store, key, size, 0, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        where = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if where + offset != self._pos:
            self._drop()
        self._pos = where + offset
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size:
            return 0
        if self._body is None:
            self._body = self._store.client.get_object(
                Bucket=self._store.bucket, Key=self._key, Range=f"bytes={self._pos}-")["Body"]
        data = self._body.read(len(buffer))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop()
        super().close()


class S3Storage(Storage):
    """Export files as objects under `prefix` in `bucket`, parts as multipart uploads."""

    def __init__(self, s3, bucket: str, prefix: str, part_size: int, url_ttl: int):
        self.client, self.bucket, self.prefix = s3, bucket, prefix
        self.part_size, self.url_ttl = part_size, url_ttl

    @classmethod
    def from_config(cls, url: str, config: Mapping) -> S3Storage:
        where = urlsplit(url)
        prefix = where.path.strip("/")
        return cls(client(config.get("S3_ENDPOINT_URL", "")), where.netloc,
                   f"{prefix}/" if prefix else "", config["S3_PART_SIZE"],
                   int(config["DOWNLOAD_URL_TTL"].total_seconds()))

    def _key(self, name: str) -> str:
        return self.prefix + self.checked(name)

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """A refusal the next attempt would meet too becomes StorageRefused, saying why."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in REFUSALS:
                raise StorageRefused(
                    f"Storage error: the bucket {self.bucket} refused to store {name} "
                    f"({error.get('Code')}: {error.get('Message') or 'no reason given'})"
                ) from exc
            raise

    def open_part(self, job_id: int, attempt: int, fmt: str,
                  keep: Prefix | None = None) -> tuple[Part, str | None]:
        """The checkpoint's upload when its parts are all there as recorded (`keep`), else a
        new upload for this claim and why the old one could not go on."""
        problem = None
        if keep is not None:
            if keep.upload is None:
                problem = f"the checkpoint's part {keep.name} is not in the bucket"
            else:
                resumed, problem = self._resume(keep)
                if resumed is not None:
                    return resumed, None
        name = self.part_name(job_id, attempt, fmt)
        with self._writing(name):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self._key(self.final_name(name)))["UploadId"]
        return UploadPart(self, name, upload_id, [], 0, 0, hashlib.sha256(), None), problem

    def _resume(self, keep: Prefix) -> tuple[UploadPart | None, str | None]:
        """The recorded upload, reconciled with the parts the bucket lists."""
        upload, key = keep.upload, self._key(self.final_name(keep.name))
        if upload["part_size"] != self.part_size:
            return None, f"the checkpoint's upload {keep.name} has parts of another size"
        try:
            listed = {}
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=key, UploadId=upload["id"])
            for page in pages:
                for part in page.get("Parts", []):
                    listed[part["PartNumber"]] = (part["ETag"].strip('"'), part["Size"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            return None, f"the checkpoint's upload of {keep.name} is gone"
        durable = 0
        for number, etag in enumerate(upload["etags"], 1):
            found, size = listed.get(number, (None, 0))
            if found != etag.strip('"'):
                return None, f"part {number} of the checkpoint's upload {keep.name} is missing"
            durable += size
        if keep.size > durable:
            return None, (f"the checkpoint's upload {keep.name} holds {durable:,} bytes, "
                          f"fewer than the {keep.size:,} it recorded")
        return UploadPart(self, keep.name, upload["id"], list(upload["etags"]), keep.size,
                          durable, None, upload["from"], upload["skip_sha256"]), None

    def upload_part(self, part: UploadPart, number: int, data: bytes) -> str:
        """Upload `data` as part `number` of `part`'s upload; its ETag."""
        with self._writing(part.name):
            return self.client.upload_part(
                Bucket=self.bucket, Key=self._key(self.final_name(part.name)),
                UploadId=part.upload_id, PartNumber=number, Body=data)["ETag"]

    def publish(self, part: UploadPart) -> str:
        """Complete the upload from the recorded ETags: the object appears whole, at once."""
        final = self.final_name(part.name)
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(part.etags, 1)]
        with self._writing(part.name):
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self._key(final), UploadId=part.upload_id,
                MultipartUpload={"Parts": parts})
        return final

    def size(self, name: str) -> int:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))[
                "ContentLength"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(name) from exc
            raise

    def open(self, name: str) -> S3Object:
        return S3Object(self, self._key(name), self.size(name))

    def verify(self, name: str, size: int, sha256: str) -> bool:
        """As a folder's, but a resumed upload's digest ("" in its checkpoint) is taken after
        the publish, so only the size can be checked then."""
        if sha256:
            return super().verify(name, size, sha256)
        try:
            return self.size(name) == size
        except FileNotFoundError:
            return False

    def _uploads(self, start: str = "job-") -> list[tuple[str, str, float]]:
        """Multipart uploads whose names start with `start`, as (part name, upload id,
        initiated)."""
        found = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix + start)
        for page in pages:
            for upload in page.get("Uploads", []):
                name = upload["Key"][len(self.prefix):] + ".part"
                if OUR_FILE.fullmatch(name):
                    found.append((name, upload["UploadId"], upload["Initiated"].timestamp()))
        return found

    def delete(self, name: str) -> None:
        """Delete the object `name`, or abort the uploads of the part `name`."""
        key = self._key(name)
        if not name.endswith(".part"):
            self.client.delete_object(Bucket=self.bucket, Key=key)
            return
        for part, upload_id, _initiated in self._uploads():
            if part == name:
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=self._key(self.final_name(name)),
                        UploadId=upload_id)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                        raise

    def entries(self) -> list[tuple[str, int, float]]:
        """Objects, and uploads in progress (as parts: their parts' bytes, their start)."""
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}job-"):
            for item in page.get("Contents", []):
                name = item["Key"][len(self.prefix):]
                if OUR_FILE.fullmatch(name):
                    found.append((name, item["Size"], item["LastModified"].timestamp()))
        for name, upload_id, initiated in self._uploads():
            found.append((name, self._uploaded(name, upload_id), initiated))
        return found

    def _uploaded(self, name: str, upload_id: str) -> int:
        """The bytes in the parts of the upload `upload_id` of the part `name`."""
        size = 0
        for page in self.client.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=self._key(self.final_name(name)), UploadId=upload_id):
            size += sum(part["Size"] for part in page.get("Parts", []))
        return size

    def parts(self, job_id: int) -> list[str]:
        """A job's uploads (listing only those, not the whole bucket: every claim asks)."""
        return sorted({name for name, _id, _at in self._uploads(f"job-{int(job_id)}.")})

    def parts_bytes(self, job_id: int | None = None) -> int:
        start = "job-" if job_id is None else f"job-{int(job_id)}."
        return sum(self._uploaded(name, upload_id)
                   for name, upload_id, _at in self._uploads(start))

    def free_bytes(self) -> None:
        """A bucket has no disk to fill."""
        return None

    def download_url(self, name: str, filename: str, mimetype: str) -> str:
        """A presigned GET valid DOWNLOAD_URL_TTL seconds, naming the file as the app would."""
        return self.client.generate_presigned_url("get_object", ExpiresIn=self.url_ttl, Params={
            "Bucket": self.bucket, "Key": self._key(name), "ResponseContentType": mimetype,
            "ResponseContentDisposition": content_disposition(filename)})
