"""/account in headless Chromium against `flask dev`: a named API token is made, shown once,
listed and revoked (with the confirmation dialog, and without JavaScript through the
confirmation page); axe finds nothing wrong with the pages."""

from __future__ import annotations

import re

import pytest
from conftest import query
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


def tokens(stack) -> list[str]:
    return [row[0] for row in query(stack.database_url, "select name from api_tokens")]


def test_create_a_token_see_it_once_then_revoke_it(browser, stack_factory, shots):  # noqa: F811
    stack = stack_factory(rows=200)
    page = open_page(browser, stack)
    log_in(page)
    page.click("nav >> text=Account")
    page.wait_for_url(re.compile(r"/account$"))
    assert page.inner_text("#account-email") == "alice@acme.test"
    no_axe_violations(page)

    page.fill("#name", "browser script")
    page.click("text=Create token")
    shown = page.locator("#new-token")
    shown.wait_for()
    token = shown.input_value()
    assert token.startswith("xd_") and len(token) > 40
    shown.focus()  # selects it all for one copy (static/exportdesk.js: no inline handler)
    assert page.evaluate("() => { const e = document.querySelector('#new-token');"
                         " return e.selectionStart === 0 && e.selectionEnd === e.value.length; }")
    assert "it will not be shown again" in page.inner_text("#tokens")
    row = page.locator("#tokens tbody tr", has_text="browser script")
    assert row.locator(".last-used").inner_text() == "never"
    no_axe_violations(page)  # the page with the new token and a list
    snap(page, shots / "account.png")

    ident = row.get_attribute("id").removeprefix("token-")
    page.goto(f"/account/tokens/{ident}/revoke")  # the confirmation page (JavaScript off)
    no_axe_violations(page)

    page.goto("/account")
    assert page.locator("#new-token").count() == 0, "shown once"
    assert token not in page.content()
    assert row.count() == 1

    dialogs: list[str] = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    row.locator("text=Revoke").click()
    page.locator("#tokens .flash", has_text="revoked").wait_for()
    assert row.count() == 0
    assert dialogs == ["Revoke the token “browser script”? Scripts using it stop working at once."]
    assert page.url.endswith("/account"), "htmx swapped the list in place"
    assert tokens(stack) == []


def test_without_javascript_revoke_asks_on_a_page(browser, stack_factory):  # noqa: F811
    stack = stack_factory(rows=200)
    page = open_page(browser, stack, js=False)
    log_in(page)
    page.goto("/account")
    page.fill("#name", "cron job")
    page.click("text=Create token")
    assert page.input_value("#new-token").startswith("xd_")
    page.click("#tokens tbody tr >> text=Revoke")
    page.wait_for_url(re.compile(r"/account/tokens/\d+/revoke$"))
    page.click("text=Yes, revoke it")
    page.wait_for_url(re.compile(r"/account#tokens$"))
    assert "Token “cron job” revoked" in page.inner_text("main")
    assert page.locator("#tokens tbody tr").count() == 0
    assert tokens(stack) == []
