"""Small things a person meets: the favicon, and `flask export` into a folder that is not
there."""

from __future__ import annotations


def test_the_favicon_is_linked_and_favicon_ico_reaches_it(client):
    page = client.get("/login").get_data(as_text=True)
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in page
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response.headers["Location"] == "/static/favicon.svg"
    icon = client.get("/static/favicon.svg")
    assert icon.status_code == 200 and icon.mimetype == "image/svg+xml"
    assert icon.get_data(as_text=True).startswith("<svg")


def test_export_into_a_missing_folder_says_so_in_one_line(app, tmp_path):
    output = tmp_path / "no" / "such" / "folder" / "out.csv"
    result = app.test_cli_runner().invoke(args=[
        "export", "transactions", "--user", "alice@acme.test", "--output", str(output)])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.strip() == (f"Error: the folder {output.parent} does not exist: "
                                     "create it, or choose another --output")
    assert not output.parent.exists()
