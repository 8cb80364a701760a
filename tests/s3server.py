"""An S3 server for tests: moto's server mode in a thread of the test process, on a free port
(no Docker, no network; the `s3` and `bucket` fixtures in conftest), and a proxy in front of it
that refuses writes."""

from __future__ import annotations

import logging
import os
import secrets
import threading

import requests
from conftest import free_port
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

# Parts this small keep a test's exports to many parts; moto is told to accept them (S3's own
# minimum is 5 MiB). Read by moto when it is imported, so set before.
PART_SIZE = 64 * 1024
os.environ["S3_UPLOAD_PART_MIN_SIZE"] = str(PART_SIZE)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's server on 127.0.0.1:`port`; `settings(bucket)` are the app's settings for it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> S3Server:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"exports-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, bucket: str, endpoint: str | None = None) -> dict[str, str]:
        """The environment a process needs to keep its export files in `bucket`."""
        return {"STORAGE_URL": f"s3://{bucket}/exports", "S3_ENDPOINT_URL": endpoint or self.url,
                "S3_PART_SIZE": str(PART_SIZE), **CREDENTIALS}

    def keys(self, bucket: str) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket)
        return [item["Key"] for item in listed.get("Contents", [])]

    def uploads(self, bucket: str) -> list[dict]:
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


REFUSAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied (writes refused by this test)</Message></Error>")


class RefusingProxy:
    """In front of an S3 server: reads and uploads' starts and ends pass, but every part
    upload (PUT) after the first `allowed` is answered 403 AccessDenied, as a bucket whose
    policy or quota refuses writes would."""

    def __init__(self, upstream: str, allowed: int = 1):
        self.upstream, self.allowed, self.refused = upstream, allowed, 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _app(self, environ, start_response):
        request = Request(environ)
        if request.method == "PUT":
            if self.allowed <= 0:
                self.refused += 1
                return Response(REFUSAL, 403, content_type="application/xml")(
                    environ, start_response)
            self.allowed -= 1
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        headers["Host"] = self.upstream.removeprefix("http://")
        answer = requests.request(request.method, self.upstream + request.full_path.rstrip("?"),
                                  headers=headers, data=request.get_data(), timeout=30)
        drop = {"content-encoding", "transfer-encoding", "connection", "content-length"}
        return Response(answer.content, answer.status_code,
                        [(k, v) for k, v in answer.headers.items() if k.lower() not in drop])(
            environ, start_response)

    def start(self) -> RefusingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()


def use_bucket(app, s3: S3Server, bucket: str, monkeypatch) -> str:
    """From now on the test app keeps its export files in `bucket` (the AWS variables point
    at moto); returns the bucket's name."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    settings = s3.settings(bucket)
    monkeypatch.setitem(app.config, "STORAGE_URL", settings["STORAGE_URL"])
    monkeypatch.setitem(app.config, "S3_ENDPOINT_URL", settings["S3_ENDPOINT_URL"])
    monkeypatch.setitem(app.config, "S3_PART_SIZE", PART_SIZE)
    return bucket
