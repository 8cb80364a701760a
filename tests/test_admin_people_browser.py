"""/admin/people in headless Chromium against `flask dev` (web and a real consumer per lane):
an admin invites a colleague, the critical lane's consumer emails the invitation to a real
SMTP server, the colleague sets a password from the link and logs in; then the admin disables
them through the confirmation dialog. axe-core checks each page for accessibility problems."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from mailserver import MailServer, links_in
from test_browser import (  # noqa: F401 (browser, close_pages, shots: fixtures)
    browser,
    close_pages,
    log_in,
    no_axe_violations,
    open_page,
    shots,
    snap,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def smtp():
    server = MailServer().start()
    yield server
    server.stop()


def test_an_admin_invites_a_colleague_who_sets_a_password_and_logs_in(
        browser, stack_factory, smtp, shots):  # noqa: F811
    stack = stack_factory(rows=1_000, SMTP_URL=smtp.url, BASE_URL="https://exportdesk.test")
    page = open_page(browser, stack, width=1200)
    log_in(page, "admin@exportdesk.test")
    page.goto("/admin/jobs")
    page.click("nav[aria-label=Admin] >> text=People")
    page.wait_for_url(re.compile(r"/admin/people/$"))
    page.locator("#orgs").wait_for()
    no_axe_violations(page)

    # A mistake first: an address that has an account already is a message by its field.
    page.fill("#invite-email", "alice@acme.test")
    page.select_option("#invite-org", label="Acme")
    page.click("#invite-submit")
    page.locator("#invite-email-error", has_text="exists already").wait_for()
    assert page.get_attribute("#invite-email", "aria-invalid") == "true"
    no_axe_violations(page)

    page.fill("#invite-email", "carol@acme.test")
    page.select_option("#invite-org", label="Acme")
    page.select_option("#invite-role", "viewer")
    snap(page, shots / "admin-people.png")
    page.click("#invite-submit")
    page.wait_for_url(re.compile(r"/admin/people/users/\d+$"))
    page.locator(".flash", has_text="Invitation sent to carol@acme.test").wait_for()
    assert page.inner_text("#user-state") == "invited"
    no_axe_violations(page)

    message = smtp.mailbox.wait_for(lambda m: m["To"] == "carol@acme.test", timeout=60)
    [link] = [link for link in links_in(message) if "/invitation/" in link]
    assert link.startswith("https://exportdesk.test/invitation/")
    page.reload()
    page.locator("#invitations", has_text="sent").wait_for()

    colleague = open_page(browser, stack)
    colleague.goto(urlsplit(link).path)
    colleague.locator("h1", has_text="Welcome: choose your password").wait_for()
    no_axe_violations(colleague)
    colleague.fill("#password", "colleague pw 1")
    colleague.fill("#confirm", "colleague pw 1")
    colleague.click("button[type=submit]")
    colleague.wait_for_url(re.compile(r"/login$"))
    colleague.fill("#email", "carol@acme.test")
    colleague.fill("#password", "colleague pw 1")
    colleague.click("button[type=submit]")
    colleague.wait_for_url(re.compile(r"/$"))
    colleague.click("header >> text=Admin")  # a viewer: the console, read-only
    colleague.locator("nav[aria-label=Admin]", has_text="read-only").wait_for()

    page.reload()
    assert page.inner_text("#user-state") == "active"
    page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm's question
    page.click("#disable")
    page.locator("#user-state", has_text="disabled").wait_for()
    page.locator(".flash", has_text="carol@acme.test is disabled").wait_for()
    log = page.locator("#people-log tbody tr")
    assert log.count() == 2
    assert "disabled" in log.nth(0).inner_text() and "invited" in log.nth(1).inner_text()
    assert "admin@exportdesk.test" in log.nth(0).inner_text()
    no_axe_violations(page)
    snap(page, shots / "admin-person.png")

    colleague.reload()
    colleague.wait_for_url(re.compile(r"/login"))
