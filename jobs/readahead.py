"""Read the next page while the caller writes the current one (the standard library only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Page = TypeVar("Page")


def read_ahead(fetch: Callable[[object], tuple[Page, object] | None],
               after: object) -> Iterator[Page]:
    """The pages of `fetch(after)` -> (page, next key) or None at the end, each one fetched in
    a thread while the caller handles the page before it. Closing the iterator waits for the
    fetch under way, so nothing reads the connection after it is handed back."""
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(fetch, after)
        while (fetched := pending.result()) is not None:
            page, after = fetched
            pending = pool.submit(fetch, after)
            yield page
