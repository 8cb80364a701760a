"""The admin job list: state tabs with counts that keep the other filters, exports and
emails apart or together, relative times with the exact time on hover."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from conftest import login
from test_admin_overview import add_jobs, listed

from jobs.models import EmailState, JobState, utcnow
from webapp import admin as admin_views


@pytest.fixture
def app(fresh):
    return fresh.app


def counted(admin, url: str) -> str:
    """The state tabs with their counts, as the page asks for them once it is shown."""
    page = admin.get(url).text
    assert 'class="tab-count"' not in page  # the list does not wait for the counts
    ask = re.search(r'id="state-tabs" hx-get="([^"]+)" hx-trigger="load"', page)
    assert ask, page
    return admin.get(ask.group(1).replace("&amp;", "&")).text


def tabs(html: str) -> dict[str, tuple[int, str]]:
    """State tab label -> (count, link)."""
    found = re.findall(r'<a href="([^"]+)" id="tab-(\w+)"[^>]*>\w+ <span class="tab-count">'
                       r"([\d,]+)</span>", html)
    return {name: (int(count.replace(",", "")), href.replace("&amp;", "&"))
            for href, name, count in found}


def test_state_tabs_count_what_each_links_to_and_keep_the_filters(app):
    day = datetime(2005, 5, 5, 12)
    add_jobs(app, *[(JobState.QUEUED, day)] * 2, (JobState.RUNNING, day),
             *[(JobState.FAILED, day)] * 3, (JobState.SUCCEEDED, day),
             (JobState.CANCELLED, day), (JobState.FAILED, day + timedelta(days=1)),
             ("email:" + EmailState.SENT, day), ("email:" + EmailState.FAILED, day))
    admin = login(app.test_client(), "admin@exportdesk.test")
    page = admin.get("/admin/jobs?date_from=2005-05-05&date_to=2005-05-05").text
    with_counts = counted(admin, "/admin/jobs?date_from=2005-05-05&date_to=2005-05-05")
    found = tabs(with_counts)
    assert 'aria-current="page"' in with_counts.split('id="tab-all"')[1][:40]
    assert {k: v[0] for k, v in found.items()} == {
        "all": 10, "queued": 2, "running": 1, "sending": 0, "retrying": 0, "failed": 4,
        "succeeded": 1, "sent": 1, "cancelled": 1}
    for name, (count, href) in found.items():
        assert "date_from=2005-05-05" in href and "date_to=2005-05-05" in href, name
        assert len(listed(admin.get(href).text)) == count, name
    assert 'id="tab-all" aria-current="page"' in page
    failed = admin.get(found["failed"][1]).text
    assert 'id="tab-failed" aria-current="page"' in failed
    assert tabs(counted(admin, found["failed"][1]))["all"][0] == 10  # every state counted

    exports = tabs(counted(admin, "/admin/jobs?date_from=2005-05-05&date_to=2005-05-05"
                                  "&kind=exports"))
    assert set(exports) == {"all", "queued", "running", "retrying", "failed", "succeeded",
                            "cancelled"}
    assert exports["all"][0] == 8 and exports["failed"][0] == 3
    emails = tabs(counted(admin, "/admin/jobs?date_from=2005-05-05&date_to=2005-05-05"
                                 "&kind=emails"))
    assert emails["all"][0] == 2 and emails["sent"][0] == 1 and "succeeded" not in emails


def test_the_kind_filter_separates_exports_and_emails(app):
    day = datetime(2006, 6, 6, 12)
    add_jobs(app, (JobState.QUEUED, day), ("email:" + EmailState.QUEUED,
                                           day + timedelta(minutes=1)),
             (JobState.FAILED, day + timedelta(minutes=2)))
    admin = login(app.test_client(), "admin@exportdesk.test")
    where = "date_from=2006-06-06&date_to=2006-06-06"
    both = listed(admin.get(f"/admin/jobs?{where}").text)
    assert [r.split("-")[0] for r in both] == ["job", "email", "job"]  # interleaved by time
    assert [r.split("-")[0] for r in listed(admin.get(f"/admin/jobs?{where}&kind=exports")
                                         .text)] == ["job", "job"]
    page = admin.get(f"/admin/jobs?{where}&kind=emails").text
    assert [r.split("-")[0] for r in listed(page)] == ["email"]
    assert re.search(r'<nav class="tabs" aria-label="Kind".*?aria-current="page">Emails<',
                     page, re.S)
    assert 'name="kind" value="emails"' in page  # the filter form keeps the kind
    assert admin.get("/admin/jobs?kind=nonsense").status_code == 200  # ignored


def test_times_are_relative_with_the_exact_time_on_hover(app):
    created = utcnow().replace(microsecond=123456) - timedelta(minutes=3, seconds=5)
    add_jobs(app, (JobState.QUEUED, created))
    admin = login(app.test_client(), "admin@exportdesk.test")
    page = admin.get("/admin/jobs?kind=exports").text
    exact = created.strftime("%Y-%m-%d %H:%M:%S UTC")
    stamp = created.replace(microsecond=0).isoformat()
    assert f'<time datetime="{stamp}Z" title="{exact}">3 min ago</time>' in page


def test_a_tab_counts_up_to_its_cap_so_its_cost_stays_flat(app, monkeypatch):
    monkeypatch.setattr(admin_views, "TAB_COUNT_CAP", 3)
    day = datetime(2007, 7, 7, 12)
    add_jobs(app, *[(JobState.FAILED, day)] * 3, *[(JobState.QUEUED, day)] * 2,
             ("email:" + EmailState.FAILED, day))
    admin = login(app.test_client(), "admin@exportdesk.test")
    page = counted(admin, "/admin/jobs?date_from=2007-07-07&date_to=2007-07-07")
    shown = dict(re.findall(r'id="tab-(\w+)"[^>]*>\w+ <span class="tab-count">([\d,+]+)</span>',
                            page))
    assert shown["all"] == "3+" and shown["failed"] == "3+"  # 4 failed: 3 exports, 1 email
    assert shown["queued"] == "2" and shown["running"] == "0"
    exports = counted(admin, "/admin/jobs?date_from=2007-07-07&date_to=2007-07-07&kind=exports")
    assert '<span class="tab-count">3</span>' in exports.split('id="tab-failed"')[1][:80]
