"""The pages in a real browser (headless Chromium via Playwright) against `flask dev`:
live progress without a reload, the download, cancel and retry, and the same without JavaScript.

Set EXPORTDESK_SCREENSHOTS=docs/screenshots to refresh the committed screenshots."""

from __future__ import annotations

import csv
import io
import os
import re
import threading
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import CSP_VIOLATIONS, no_csp_violations, query, require, wait_for, watch_csp
from expected import expected_rows

from webapp.headers import CSP

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROWS = 300_000


def slow_exports(batch_rows: int) -> dict[str, str]:
    """Tiny batches and frequent checkpoints: an export lasts long enough to watch or cancel."""
    return {"EXPORT_BATCH_ROWS": str(batch_rows), "CHECKPOINT_INTERVAL": "0.05"}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        require("chromium", f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(autouse=True)
def close_pages(browser):
    """A test's pages close with it: none polls on against a stack that has stopped; then the
    test fails if the Content-Security-Policy refused anything on any of them."""
    CSP_VIOLATIONS.clear()  # none left from elsewhere
    yield
    for context in browser.contexts:
        context.close()
    no_csp_violations()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: the docs folder when asked for, else a temporary one."""
    folder = Path(os.environ.get("EXPORTDESK_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def no_axe_violations(page, where: str = "") -> None:
    """axe-core's checks on the page as it is now (they run in the page: JavaScript on)."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    assert results.violations_count == 0, f"{where or page.url}\n{results.generate_report()}"


def snap(page, path: Path) -> None:
    """The whole page, no taller than its content: small files for docs/screenshots."""
    page.screenshot(path=path, full_page=True)


def open_page(browser, stack, js: bool = True, width: int = 1024, height: int = 560):
    context = browser.new_context(base_url=stack.url, java_script_enabled=js,
                                  viewport={"width": width, "height": height},
                                  accept_downloads=True)
    watch_csp(context)
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


class _Refused(BaseHTTPRequestHandler):
    """A page our Content-Security-Policy refuses: an inline style and an inline script."""

    def do_GET(self) -> None:
        body = (b"<!doctype html><title>refused</title><p style='color: red'>styled</p>"
                b"<script>document.title = 'ran'</script>")
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("js", [True, False])
def test_the_csp_guard_sees_what_the_policy_refuses(browser, js):
    """What makes every browser test fail on a violation does see one, JavaScript on or off."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refused)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = open_page(browser, SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}"),
                         js=js)
        page.goto("/")
        wait_for(lambda: len(CSP_VIOLATIONS) >= (2 if js else 1) or page.title() == "ran",
                 what="the violations", timeout=10)
        assert page.title() == "refused", "the inline script must not run"
        seen = "\n".join(CSP_VIOLATIONS)
        assert "inline style" in seen
        assert ("inline script" in seen) == js, seen
        with pytest.raises(AssertionError, match="Content-Security-Policy refused"):
            no_csp_violations()
    finally:
        CSP_VIOLATIONS.clear()
        server.shutdown()
        server.server_close()


def log_in(page, email: str = "alice@acme.test", shot: Path | None = None) -> None:
    page.goto("/login")
    page.fill("#email", email)
    page.fill("#password", "exportdesk")
    if shot:
        snap(page, shot)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))


def start_export(page, dataset: str, **params: str) -> int:
    page.goto("/")
    for name, value in params.items():
        page.fill(f"#{dataset}-{name}", value)
    page.click(f"#form-{dataset} button[type=submit]")
    page.wait_for_url(re.compile(r"/exports/\d+$"))
    return int(page.url.rsplit("/", 1)[1])


def job_row(stack, job_id: int) -> dict:
    [job] = query(stack.database_url, "select * from export_jobs where id = :id", id=job_id)
    job = dict(job._mapping)
    job["attempts"] = [dict(a._mapping) for a in query(
        stack.database_url, "select * from job_attempts where job_id = :id order by number",
        id=job_id)]
    return job




def csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))


RECORD_PROGRESS = """() => {
  window.__seen = [];
  window.__notReloaded = true;
  const record = () => {
    const bar = document.querySelector('[role=progressbar]');
    if (bar) window.__seen.push(bar.getAttribute('aria-valuenow'));
  };
  record();
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true});
}"""


def test_live_progress_then_download_link_without_reload(browser, stack_factory, shots):
    stack = stack_factory(rows=ROWS, **slow_exports(10))
    page = open_page(browser, stack)
    log_in(page, shot=shots / "login.png")

    # inline validation while filling in the form
    button = page.locator("#form-transactions button[type=submit]")
    where = button.bounding_box()
    page.fill("#transactions-date_from", "2026-12-01")
    page.fill("#transactions-date_to", "2026-10-31")
    error = page.locator("#transactions-date_to-error")
    error.filter(has_text="must not be before the start date").wait_for()
    snap(page, shots / "new-export-error.png")
    page.fill("#transactions-date_from", "")
    page.wait_for_function(
        "() => document.querySelector('#transactions-date_to-error').textContent === ''")
    estimate = page.locator("#transactions-estimate")
    estimate.filter(has_text=re.compile(r"About [\d,]+ rows")).wait_for()
    # the estimate coming in does not move the button: a click at that instant still lands
    assert button.bounding_box() == where
    snap(page, shots / "new-export.png")

    polls = []
    page.on("request", lambda r: r.method == "GET" and polls.append(r.url))
    job_id = start_export(page, "transactions", date_to="2026-10-31")
    page.evaluate(RECORD_PROGRESS)
    page.locator(".stats .rows").filter(has_text=re.compile(r"[1-9]")).wait_for()
    assert page.inner_text(".stats .elapsed") != "–"
    page.locator(".stats .eta").filter(has_text=re.compile(r"\d")).wait_for()
    assert re.match(r"\d+% · Export #", page.title()), page.title()
    snap(page, shots / "job-running.png")

    link = page.locator("a.download")
    link.wait_for(timeout=180_000)
    assert page.evaluate("window.__notReloaded"), "the page was reloaded"
    seen = {v for v in page.evaluate("window.__seen") if v is not None}
    assert len(seen) >= 2, f"progress showed only {seen}"
    assert not page.locator("[role=progressbar]").count()
    assert page.inner_text("#job-status") == "Export ready"
    assert page.title() == f"Ready · Export #{job_id} · exportdesk"
    assert page.evaluate(
        f"() => !document.querySelector('#job-{job_id}')"
        ".contains(document.querySelector('#job-status'))"), "live region must not be swapped"

    want = expected_rows(stack.database_url, "transactions", "acme",
                         "and created_at < ?", ("2026-11-01",))
    name = link.inner_text()
    assert re.fullmatch(r"Download transactions-acme-\d{4}-\d\d-\d\d-\d+\.csv", name)
    facts = page.inner_text(".file-facts")
    assert f"{len(want) - 1:,} rows" in facts and re.search(r"\d (kB|MB)", facts)
    snap(page, shots / "job-done.png")

    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == name.removeprefix("Download ")
    assert csv_rows(Path(download.value.path())) == want

    job_url = f"{stack.url}/exports/{job_id}"
    polls_at_end = polls.count(job_url)
    page.wait_for_timeout(2500)
    assert polls.count(job_url) == polls_at_end, "polling must stop once the job is over"
    assert polls_at_end >= 2, "progress came by polling"

    page.click("nav >> text=My exports")
    page.locator(f"#download-{job_id}").wait_for()
    snap(page, shots / "my-exports.png")
    phone = open_page(browser, stack, width=390, height=640)
    log_in(phone)
    pages = {f"/exports/{job_id}": "phone-job.png", "/exports": "phone-my-exports.png",
             "/": "phone-new-export.png"}
    for path, shot in pages.items():
        phone.goto(path)
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        snap(phone, shots / shot)


def test_cancel_a_running_export_from_my_exports_then_retry(browser, stack_factory, shots):
    # the default checkpoint interval: a cancel must take effect within 2 s with it
    stack = stack_factory(rows=ROWS, **{**slow_exports(1), "CHECKPOINT_INTERVAL": "0.5"})
    page = open_page(browser, stack)
    log_in(page)
    job_id = start_export(page, "transactions")
    page.click("nav >> text=My exports")
    row = page.locator(f"#row-{job_id}")
    row.locator(".badge", has_text="Running").wait_for()
    row.locator("[role=progressbar]:not([aria-valuenow='0.0'])").wait_for()
    snap(page, shots / "my-exports-running.png")

    posts = []
    page.on("request", lambda r: r.method == "POST" and posts.append(r))
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click(f"#cancel-{job_id}")
    page.wait_for_timeout(500)
    assert posts == [] and job_row(stack, job_id)["state"] == "running", "dismissed: no cancel"

    dialogs = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.click(f"#cancel-{job_id}")
    row.locator(".badge", has_text="Cancelled").wait_for()
    assert dialogs and f"Cancel export #{job_id}?" in dialogs[0]
    assert posts[0].url.endswith(f"/exports/{job_id}/cancel")
    assert posts[0].headers.get("x-csrftoken"), "htmx must send the CSRF token"

    job = wait_for(lambda: (j := job_row(stack, job_id))["attempts"][-1]["finished_at"] and j,
                     what="the worker to stop")
    assert job["state"] == "cancelled" and job["attempts"][-1]["outcome"] == "cancelled"
    assert 0 < job["rows_done"] < job["rows_total"]
    cancelled, stopped = (datetime.fromisoformat(str(t))
                          for t in (job["finished_at"], job["attempts"][-1]["finished_at"]))
    assert timedelta(0) <= stopped - cancelled <= timedelta(seconds=2), "stops within 2 s"
    exports = stack.instance / "exports"
    assert not list(exports.glob(f"job-{job_id}.*")), "the part file is removed"

    page.locator(f"#retry-{job_id}").click()
    row.locator(".badge", has_text=re.compile("Queued|Running")).wait_for()
    row.locator(".badge", has_text="Running").wait_for()
    assert job_row(stack, job_id)["state"] == "running"


def test_without_javascript_every_page_still_works(browser, stack_factory, shots):
    stack = stack_factory(rows=ROWS, **slow_exports(20))
    page = open_page(browser, stack, js=False)
    log_in(page)

    page.fill("#orders-date_from", "2026-05-01")
    page.fill("#orders-date_to", "2026-04-01")
    page.click("#form-orders button[type=submit]")
    assert page.inner_text("#orders-date_to-error") == "To must not be before the start date"

    job_id = start_export(page, "orders", date_from="", date_to="")
    assert page.locator("[role=progressbar]").count() == 1
    link = page.locator("a.download")
    link.wait_for(timeout=180_000)  # the page refreshes itself (meta refresh in <noscript>)
    with page.expect_download() as download:
        link.click()
    want = expected_rows(stack.database_url, "orders", "acme")
    assert csv_rows(Path(download.value.path())) == want

    slow = start_export(page, "transactions")
    page.goto("/exports")
    page.click(f"#cancel-{slow}")
    page.wait_for_url(re.compile(rf"/exports/{slow}/cancel\?view=list$"))
    snap(page, shots / "cancel-confirm.png")
    page.click("text=Yes, cancel it")
    page.wait_for_url(re.compile(r"/exports$"))
    assert page.inner_text(f"#row-{slow} .badge") == "Cancelled"
    assert page.inner_text(f"#row-{job_id} .badge") == "Succeeded"
    wait_for(lambda: all(a["finished_at"] for a in job_row(stack, slow)["attempts"]),
               what="the worker (if it had started) to stop")
    page.click(f"#retry-{slow}")
    page.wait_for_url(re.compile(r"/exports$"))
    assert page.inner_text(f"#row-{slow} .badge") in ("Queued", "Running")
