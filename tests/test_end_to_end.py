"""The walking skeleton for real: `flask dev` (web + a consumer per lane), driven over HTTP."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from conftest import ROOT, csrf_from
from expected import expected_rows

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc, so it works without psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def browser_login(url: str, email: str) -> requests.Session:
    session = requests.Session()
    token = csrf_from(session.get(f"{url}/login").text)
    response = session.post(f"{url}/login", data={"email": email, "password": "exportdesk",
                                                   "csrf_token": token})
    assert response.status_code == 200 and response.url == f"{url}/"
    return session


def test_click_export_watch_progress_download_matches_sql(stack_factory):
    # Pages of 50 rows keep the export running for seconds, so the page (polled every 0.1 s)
    # sees it half-way also on PostgreSQL, whose COPY path finishes pages of 500 in a blink.
    stack = stack_factory(rows=60_000, EXPORT_BATCH_ROWS="50", CHECKPOINT_INTERVAL="0.05")
    web = browser_login(stack.url, "alice@acme.test")
    token = csrf_from(web.get(f"{stack.url}/").text)
    response = web.post(f"{stack.url}/exports", allow_redirects=False, data={
        "dataset": "transactions", "format": "csv", "csrf_token": token,
        "date_from": "", "date_to": "2026-10-31", "status": ""})
    assert response.status_code == 303
    job_url = stack.url + response.headers["Location"]

    seen_progress: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fragment = web.get(job_url, headers={"HX-Request": "true"}).text
        seen_progress.update(re.findall(r'aria-valuenow="([^"]+)"', fragment))
        if "state-succeeded" in fragment:
            break
        assert "state-failed" not in fragment, fragment
        time.sleep(0.1)
    else:
        raise AssertionError("export did not finish:\n" + stack.log.read_text())
    assert 'hx-trigger' not in fragment, "polling must stop once the job is over"
    assert "Export ready" in fragment
    assert len(seen_progress - {"0.0"}) >= 1, seen_progress

    download = web.get(job_url + "/download")
    assert download.status_code == 200
    assert re.fullmatch(r'attachment; filename=transactions-acme-\d{4}-\d\d-\d\d-\d+\.csv',
                        download.headers["Content-Disposition"])
    rows = list(csv.reader(io.StringIO(download.content.decode("utf-8"), newline="")))
    want = expected_rows(stack.database_url, "transactions", "acme",
                         "and created_at < ?", ("2026-11-01",))
    assert rows == want and len(want) > 20_000

    other = browser_login(stack.url, "bob@globex.test")
    assert other.get(job_url + "/download").status_code == 404
    assert requests.get(job_url + "/download", allow_redirects=False).status_code == 302


def test_api_token_export_and_ctrl_c_leaves_no_process_behind(stack_factory):
    stack = stack_factory()
    token = subprocess.run(
        [sys.executable, "-m", "flask", "token", "create", "bob@globex.test"],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    auth = {"Authorization": f"Bearer {token}"}
    job = requests.post(f"{stack.url}/api/exports", headers=auth,
                        json={"dataset": "orders", "format": "csv"}).json()
    deadline = time.monotonic() + 30
    while job["state"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = requests.get(f"{stack.url}/api/jobs/{job['id']}", headers=auth).json()
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["rows_done"] == job["rows_total"] > 0
    body = requests.get(job["download_url"], headers=auth)
    assert body.status_code == 200 and body.content.startswith(b"id,created_at,customer")

    procs = descendants(stack.proc.pid)
    assert len(procs) >= 3 + 8 + 2, "web, two consumers and their workers"
    stack.proc.send_signal(signal.SIGINT)
    stack.proc.wait(30)
    time.sleep(0.5)
    assert [p for p in procs if alive(p)] == []
