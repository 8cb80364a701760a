"""In a real browser against `flask dev`: repeat an export weekly, run the schedule now, and
download its run's file from the schedule's page; register a webhook, see its delivery and
resend it; the pages pass axe-core."""

from __future__ import annotations

import re

import pytest
from conftest import wait_for
from standardwebhooks.webhooks import Webhook
from test_browser import (  # noqa: F401 (fixtures)
    browser,
    close_pages,
    log_in,
    no_axe_violations,
    open_page,
)
from test_webhooks import Receiver

pytestmark = pytest.mark.integration


def test_a_weekly_schedule_from_an_export_runs_now_and_its_file_downloads(browser,  # noqa: F811
                                                                          stack_factory):
    stack = stack_factory(rows=2_000)
    page = open_page(browser, stack)
    log_in(page)
    page.goto("/")
    page.select_option("#orders-status", "shipped")
    page.click("#form-orders button[type=submit]")
    page.wait_for_url(re.compile(r"/exports/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    page.click("#repeat")
    page.wait_for_url(re.compile(rf"/schedules/new\?job={job_id}$"))
    assert page.input_value("#s-repeat") == "weekly"
    assert page.input_value("#s-date_range") == "previous_week"
    assert page.input_value("#s-status") == "shipped"
    no_axe_violations(page, "the new schedule form")
    page.fill("#s-timezone", "Europe/Berlin")
    page.select_option("#s-weekday", "0")
    page.fill("#s-at", "08:00")
    page.click("button:has-text('Create schedule')")
    page.wait_for_url(re.compile(r"/schedules/\d+$"))
    assert "Every Monday at 08:00 (Europe/Berlin)" in page.inner_text("main")
    assert re.match(r"Mon \d\d \w{3} \d{4} 08:00 CES?T", page.inner_text("#next-run"))
    no_axe_violations(page, "the schedule's page")
    schedule_url = page.url

    page.click("button:has-text('Run now')")
    page.wait_for_url(re.compile(r"/exports/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    assert run_id != job_id
    page.wait_for_selector("a.download", timeout=60_000)

    page.goto(schedule_url)
    link = page.locator(f"#download-{run_id}")
    assert link.is_visible() and "Succeeded" in page.inner_text("main")
    with page.expect_download() as download:
        link.click()
    assert download.value.path().read_bytes().startswith(b"id,created_at,customer")

    page.goto("/schedules")
    assert "Orders every week" in page.inner_text("main")
    no_axe_violations(page, "the schedules list")


def test_a_webhook_registered_in_the_browser_is_delivered_and_resent(browser,  # noqa: F811
                                                                     stack_factory):
    endpoint = Receiver()
    try:
        stack = stack_factory(rows=2_000, WEBHOOK_ALLOW_PRIVATE="true")
        page = open_page(browser, stack)
        log_in(page)
        page.goto("/webhooks")
        no_axe_violations(page, "the webhooks page")
        page.fill("#w-url", endpoint.url)
        page.click("button:has-text('Add endpoint')")
        secret = page.inner_text("#secret")
        assert secret.startswith("whsec_")
        no_axe_violations(page, "a new endpoint with its secret")
        page.goto("/")
        page.click("#form-orders button[type=submit]")
        page.wait_for_url(re.compile(r"/exports/\d+$"))
        page.wait_for_selector("a.download", timeout=60_000)
        page.goto("/webhooks")
        page.click(f"a:has-text('{endpoint.url}')")
        endpoint_page = page.url
        wait_for(lambda: page.reload() and "Delivered" in page.inner_text("main"), 60,
                 "the delivery")
        assert secret not in page.inner_text("main"), "the secret is shown once"
        no_axe_violations(page, "the delivery log")
        page.click("button:has-text('Resend')")
        page.wait_for_url(endpoint_page)
        wait_for(lambda: len(endpoint.requests) == 2, 60, "the resent delivery")
        first, again = endpoint.requests
        assert first[0]["webhook-id"] == again[0]["webhook-id"]
        assert Webhook(secret).verify(again[1], again[0])["type"] == "export.succeeded"
    finally:
        endpoint.close()
