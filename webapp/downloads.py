"""The one answer to every download of an export file, from the job page or an emailed link."""

from __future__ import annotations

import base64
from datetime import UTC

from flask import Response, abort, current_app, make_response, redirect, request, send_file
from werkzeug.exceptions import RequestedRangeNotSatisfiable
from werkzeug.http import is_resource_modified

from jobs.formats import MIME_TYPES
from jobs.models import ExportJob
from jobs.storage import storage
from webapp.views import refused


def repr_digest(sha256_hex: str) -> str:
    """The Repr-Digest header (RFC 9530) for a hex SHA-256: `sha-256=:<base64 of the bytes>:`."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode('ascii')}:"


def send_export(job: ExportJob) -> Response:
    """The job's published file as an attachment (the caller has checked the job may be
    downloaded).

    Its recorded SHA-256 is the strong ETag (`"<hex>"`) and the Repr-Digest, so a client can
    check what it received; Last-Modified is when the job published it; Content-Length is the
    file's size, so Range (206, also with If-Range), If-None-Match and If-Modified-Since (304)
    are answered; HEAD sends the headers alone. A job with no recorded digest (older rows) is
    served without either header.

    From a bucket, the answer is a redirect to a presigned address (DOWNLOAD_URL_TTL) that
    names the file as `Content-Disposition`, so the bytes never pass through the app; the
    bucket answers Range requests itself, and the app answers If-None-Match and
    If-Modified-Since (304) before redirecting. DOWNLOAD_REDIRECT=false streams instead.
    """
    files = storage()
    mimetype = MIME_TYPES.get(job.format, "application/octet-stream")
    url = files.download_url(job.file_name, job.download_name(), mimetype) \
        if current_app.config["DOWNLOAD_REDIRECT"] else None
    if url is not None:
        finished = job.finished_at.replace(tzinfo=UTC) if job.finished_at else None
        if not is_resource_modified(request.environ, etag=job.sha256, last_modified=finished):
            unchanged = Response(status=304)
            if job.sha256:
                unchanged.set_etag(job.sha256)
            return unchanged
        return redirect(url, 302)
    try:
        size = files.size(job.file_name)
        fh = files.open(job.file_name)  # once open, the bytes stay readable even if deleted
    except FileNotFoundError:  # removed since the caller looked (retention)
        abort(404, "This export has no file to download (yet).")
    response = send_file(fh, mimetype=mimetype, as_attachment=True,
                         download_name=job.download_name(), max_age=0,
                         etag=job.sha256 or False, conditional=False)
    response.content_length = size
    if job.finished_at:  # when the file was published: If-Modified-Since can answer 304
        response.last_modified = job.finished_at.replace(tzinfo=UTC)
    if job.sha256:
        response.headers["Repr-Digest"] = repr_digest(job.sha256)
    try:
        return response.make_conditional(request, accept_ranges=True, complete_length=size)
    except RequestedRangeNotSatisfiable:  # 416 says how long the file is (RFC 9110 15.5.17)
        response.close()
        answer = make_response(refused("The range asked for is not in the file.", 416))
        answer.headers["Content-Range"] = f"bytes */{size}"
        return answer
