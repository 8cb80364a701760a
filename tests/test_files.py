"""The files people get: a download name of its own for every job, and an xlsx header row to
work with (bold, frozen, filterable, columns wide enough)."""

from __future__ import annotations

from dataclasses import replace

import openpyxl
import pytest
from conftest import run_inline

from jobs import datasets
from jobs.dataset_file import DatasetFileError, load
from jobs.formats import XLSX_WIDTHS
from jobs.models import ExportJob, db
from webapp.auth import find_user


def two_jobs_of_one_day() -> list[ExportJob]:
    """Two jobs of Alice's, recorded now (in the caller's app context)."""
    user = find_user("alice@acme.test")
    jobs = [ExportJob(user=user, org_id=user.org_id, dataset="transactions", params={},
                      format="csv") for _ in range(2)]
    db.session.add_all(jobs)
    db.session.commit()
    return jobs


def test_two_exports_of_one_day_get_different_names(app):
    with app.app_context():
        first, second = two_jobs_of_one_day()
        assert first.created_at.date() == second.created_at.date()
        day = first.created_at.date().isoformat()
        assert first.download_name() == f"transactions-acme-{day}-{first.id}.csv"
        assert second.download_name() == f"transactions-acme-{day}-{second.id}.csv"


@pytest.mark.parametrize("pattern, expected", [
    ("tx-{date}", "tx-{date}-{job}.csv"),  # no {job}: the id is added
    ("{job}-{org}", "{job}-acme.csv"),
])
def test_a_pattern_always_holds_the_job_id(app, monkeypatch, pattern, expected):
    with app.app_context():
        declared = datasets.declared()
        mine = {**declared, "transactions": replace(declared["transactions"], filename=pattern)}
        monkeypatch.setitem(app.extensions, "exportdesk.datasets", mine)
        first, second = two_jobs_of_one_day()
        for job in (first, second):
            assert job.download_name() == expected.format(
                date=job.created_at.date().isoformat(), job=job.id)
        assert first.download_name() != second.download_name()


DATASET = ('[[dataset]]\nname = "a"\ntable = "t"\nkey = "id"\ntenant = "o"\n'
           'columns = [{name="id", kind="int"}]\nfilename = "%s"\n')


def test_the_datasets_file_accepts_job_and_refuses_other_names(tmp_path):
    path = tmp_path / "datasets.toml"
    path.write_text(DATASET % "a-{org}-{job}")
    assert load(str(path))["a"].filename == "a-{org}-{job}"
    path.write_text(DATASET % "a-{jobid}")
    with pytest.raises(DatasetFileError, match="may only use .*{job}"):
        load(str(path))


def test_xlsx_header_is_bold_frozen_filtered_and_columns_have_widths(app, instance):
    job = run_inline(app, "alice@acme.test", "transactions", fmt="xlsx")
    assert job.state == "succeeded", job.error
    sheet = openpyxl.load_workbook(instance / "exports" / job.file_name).worksheets[0]
    with app.app_context():
        dataset = datasets.get("transactions")
    header = next(sheet.iter_rows(min_row=1, max_row=1))
    assert [cell.value for cell in header] == list(dataset.headers)
    assert all(cell.font.b for cell in header)
    assert not any(cell.font.b for cell in next(sheet.iter_rows(min_row=2, max_row=2)))
    assert sheet.freeze_panes == "A2"
    last = openpyxl.utils.get_column_letter(len(dataset.columns))
    assert sheet.auto_filter.ref == f"A1:{last}{job.rows_done + 1}"
    widths = {i: d.width for d in sheet.column_dimensions.values()  # a run of equal widths
              for i in range(d.min, d.max + 1)}                      # is one <col>
    for i, column in enumerate(dataset.columns, start=1):
        assert widths[i] >= max(XLSX_WIDTHS[column.kind], len(dataset.headers[i - 1])), column


def test_a_long_header_widens_its_column_up_to_a_limit():
    from jobs.formats import XLSX_MAX_WIDTH, xlsx_width

    assert xlsx_width("id", "int") == XLSX_WIDTHS["int"]
    assert xlsx_width("Customer reference number", "int") == len("Customer reference number") + 3
    assert xlsx_width("x" * 200, "text") == XLSX_MAX_WIDTH
