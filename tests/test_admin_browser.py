"""The admin console in headless Chromium against `flask dev`: a running export's row shows
live progress, then an admin cancels it from its page (accepting the confirmation dialog) and
retries it."""

from __future__ import annotations

import re
import time

import pytest
from conftest import wait_for
from test_browser import (  # noqa: F401 (browser, close_pages, shots: fixtures)
    ROWS,
    browser,
    close_pages,
    job_row,
    log_in,
    open_page,
    shots,
    slow_exports,
    snap,
    start_export,
)

pytestmark = pytest.mark.integration


def test_admin_sees_live_progress_cancels_a_running_export_then_retries_it(
        browser, stack_factory, shots):  # noqa: F811
    stack = stack_factory(rows=ROWS, **slow_exports(1))
    owner = open_page(browser, stack)
    log_in(owner)
    job_id = start_export(owner, "transactions")

    page = open_page(browser, stack, width=1200)
    log_in(page, "admin@exportdesk.test")
    page.goto("/admin/jobs")
    row = page.locator(f"#job-row-{job_id}")
    row.locator(".badge", has_text="running").wait_for()
    # The state tabs' counts come after the list, in a request of their own.
    page.locator("#tab-running .tab-count").wait_for()
    assert int(page.locator("#tab-running .tab-count").inner_text()) >= 1
    bar = row.locator("[role=progressbar]")
    first = float(bar.get_attribute("aria-valuenow"))
    page.wait_for_function(  # the row refreshes itself: no reload
        f"() => parseFloat(document.querySelector('#job-row-{job_id} [role=progressbar]')"
        f"?.getAttribute('aria-valuenow')) > {first}")
    snap(page, shots / "admin-jobs.png")

    # Held down for 1.5 s, as a person's click can be: a row refresh in between must not
    # replace the link (a mouse-up on a new link after a mouse-down on the old is no click).
    row.locator(f"a[href$='/admin/jobs/{job_id}']").click(delay=1_500)
    page.wait_for_url(re.compile(rf"/admin/jobs/{job_id}$"))
    sent: list[float] = []  # when the browser sent the cancel: the click, as the server sees it
    cancel_url = f"{stack.url}/admin/jobs/{job_id}/cancel"
    page.on("request", lambda r: r.url == cancel_url and sent.append(time.monotonic()))
    dialogs: list[str] = []  # Cancel asks first: accept the dialog (htmx then posts)
    page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    with page.expect_response(cancel_url, timeout=5_000) as answer:  # a lost click fails here
        page.click("#admin-cancel")
    assert answer.value.status == 200, answer.value.status  # htmx: HX-Redirect to the page
    assert dialogs and dialogs[0].startswith(f"Cancel export #{job_id}?"), dialogs
    page.locator("h1 .badge", has_text="cancelled").wait_for(timeout=2_000)
    assert time.monotonic() - sent[0] < 2, "the cancel shows within 2 s of the click"
    job = wait_for(lambda: (j := job_row(stack, job_id))["attempts"][-1]["finished_at"] and j,
                     what="the worker to stop")
    assert job["state"] == "cancelled" and job["attempts"][-1]["outcome"] == "cancelled"

    page.reload()
    page.click("#admin-retry")
    page.locator("h1 .badge", has_text=re.compile("queued|running")).wait_for()
    wait_for(lambda: job_row(stack, job_id)["state"] == "running", what="the retry to run")
    audit = page.locator("#audit tbody tr")
    assert audit.count() == 2
    assert "cancelled" in audit.nth(0).inner_text() and "retried" in audit.nth(1).inner_text()
    snap(page, shots / "admin-job.png")
    page.goto("/admin/lanes")
    page.locator("#lane-exports svg").wait_for()
    snap(page, shots / "admin-lanes.png")
