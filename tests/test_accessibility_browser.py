"""Every page in headless Chromium against one `flask dev` stack, at desktop width (1280 px) and
on a phone (390 px), as the person who would see it: axe-core finds no violation, nothing
scrolls sideways and no form control sticks out of its card at 390 px, and the
Content-Security-Policy refuses nothing (the close_pages fixture).

Set EXPORTDESK_SCREENSHOTS=docs/screenshots to refresh admin-overview.png and
phone-new-export.png."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import (
    TEST_DATABASE_URL,
    Stack,
    database_for,
    drop_database,
    free_port,
    migrate_and_seed,
    wait_for,
)
from test_browser import (  # noqa: F401 (browser, close_pages, shots: fixtures)
    browser,
    close_pages,
    job_row,
    log_in,
    no_axe_violations,
    open_page,
    shots,
    snap,
    start_export,
)

pytestmark = pytest.mark.integration
WIDTHS = {"desktop": 1280, "phone": 390}
ALICE, ADMIN = "alice@acme.test", "admin@exportdesk.test"

# name: (who, path; {job} is the finished export's id); None: not logged in
PAGES = {
    "login": (None, "/login"),
    "new-export": (ALICE, "/"),
    "job": (ALICE, "/exports/{job}"),
    "my-exports": (ALICE, "/exports"),
    "admin-overview": (ADMIN, "/admin/"),
    "admin-jobs": (ADMIN, "/admin/jobs"),
    "admin-job": (ADMIN, "/admin/jobs/{job}"),
    "admin-lanes": (ADMIN, "/admin/lanes"),
    "admin-people": (ADMIN, "/admin/people/"),
    "account": (ALICE, "/account"),
    "schedules": (ALICE, "/schedules"),
    "new-schedule": (ALICE, "/schedules/new?job={job}"),
    "admin-schedules": (ADMIN, "/admin/schedules"),
    "webhooks": (ALICE, "/webhooks"),
}

# Every form control of a card ends inside it (a date input or a select can be wider than
# its grid column and stick out without making the page scroll).
STICKING_OUT = """() => [...document.querySelectorAll('.card')].flatMap(card => {
  const edge = card.getBoundingClientRect().right + 0.5;
  return [...card.querySelectorAll('input:not([type=hidden]), select, button, textarea')]
    .filter(e => e.getBoundingClientRect().right > edge)
    .map(e => `${e.id || e.name || e.tagName} ends at ${e.getBoundingClientRect().right}`
              + ` beyond its card (${edge})`);
})"""

# The search field shows its whole placeholder (its text fits in the box).
PLACEHOLDER_FITS = """(id) => {
  const e = document.getElementById(id), s = getComputedStyle(e);
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = `${s.fontSize} ${s.fontFamily}`;
  const room = e.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight);
  return [ctx.measureText(e.placeholder).width, room];
}"""


# What each cell shows before its value (its data-label, on a phone).
LABELS = """(selector) => [...document.querySelectorAll(selector)]
  .filter(e => e.offsetParent !== null)
  .map(e => getComputedStyle(e, '::before').content)"""


@pytest.fixture(scope="module")
def site(browser, tmp_path_factory):  # noqa: F811
    """One stack for every page; Alice's small export has succeeded."""
    path = tmp_path_factory.mktemp("a11y")
    env = {**os.environ, "INSTANCE_PATH": str(path), "FLASK_APP": "webapp",
           "PYTHONUNBUFFERED": "1", "DATABASE_URL": database_for(path)}
    migrate_and_seed(env, 1_000)
    stack = Stack(path, free_port(), env)
    try:
        stack.start()
        page = open_page(browser, stack)
        log_in(page)
        job_id = start_export(page, "orders")
        wait_for(lambda: job_row(stack, job_id)["state"] == "succeeded", timeout=60,
                 what="the export to succeed")
        page.context.close()
        yield stack, job_id
    finally:
        stack.stop()
        if TEST_DATABASE_URL:
            drop_database(TEST_DATABASE_URL, stack.database_url)
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", PAGES)
def test_page_is_accessible_and_fits(browser, site, shots, name, width):  # noqa: F811
    stack, job_id = site
    who, path = PAGES[name]
    page = open_page(browser, stack, width=WIDTHS[width], height=800 if width == "desktop" else 720)
    if who:
        log_in(page, who)
    page.goto(path.format(job=job_id))
    assert page.url.endswith(path.format(job=job_id)), f"{name} landed on {page.url}"
    if name == "job":
        page.locator("a.download").wait_for()

    no_axe_violations(page, f"{name} at {width}")
    if width == "phone":
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
            f"{name} scrolls sideways at 390 px: "
            f"{page.evaluate('document.documentElement.scrollWidth')} px wide")
        assert page.evaluate(STICKING_OUT) == [], name
        if name == "admin-jobs":
            text, room = page.evaluate(PLACEHOLDER_FITS, "f-q")
            assert text <= room, f"the search placeholder is cut: {text} px in {room} px"
            to, since = (page.locator(f"#f-{f}").bounding_box() for f in ("to", "from"))
            assert to["y"] == since["y"], "From and To share a row"
        if name == "admin-job":  # the attempts become cards whose every value is labelled
            shown = page.evaluate(LABELS, "#attempts td")
            assert shown and all(label.startswith(('"Attempt', '"Worker', '"Start', '"End',
                                                   '"Took', '"Outcome', '"Error'))
                                 for label in shown), shown

    if name == "admin-overview" and width == "desktop":
        page.screenshot(path=shots / "admin-overview.png")
    if name == "new-export" and width == "phone":
        snap(page, shots / "phone-new-export.png")
