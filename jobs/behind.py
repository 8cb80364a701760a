"""Work done one step behind the caller, in a thread of its own: the deflate of xlsx (ISA-L lets
go of the GIL) runs while the next page's cells are built. One
step in flight at most, so memory holds two pages; its error (a full disk) is raised at the
next step or `wait`, in the caller's thread."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as settled


class OneBehind:
    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: Future | None = None

    def submit(self, step: Callable[..., object], *args) -> None:
        """Run `step(*args)` once the one in flight is done (the caller keeps `args` alive)."""
        self.wait()
        self._pending = self._pool.submit(step, *args)

    def wait(self) -> None:
        """The step in flight done; its error raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def settle(self) -> None:
        """The step in flight done, whatever came of it (the next `wait` still raises its
        error): after an export stops, nothing more writes its file."""
        if self._pending is not None:
            settled([self._pending])

    def close(self) -> None:
        """No more steps: the thread ends once the one in flight is done."""
        self._pool.shutdown(wait=True)
