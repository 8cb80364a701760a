"""Where export files live: one small interface, a local folder for now (S3 later)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


class LocalStorage:
    """Export files in one folder, named only by job id and format, never by request input."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _part(self, job_id: int, fmt: str) -> Path:
        return self.root / f"job-{int(job_id)}.{fmt}.part"

    def _final(self, name: str) -> Path:
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"not a file name of ours: {name!r}")
        return self.root / name

    def open_part(self, job_id: int, fmt: str, size: int) -> BinaryIO:
        """The part file cut back to `size` bytes (the last checkpoint), positioned at its end."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._part(job_id, fmt)
        fh = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 (caller closes)
        fh.truncate(size)
        fh.seek(size)
        return fh

    def publish(self, job_id: int, fmt: str) -> str:
        """Rename the finished part into place (atomic); returns the stored file's name."""
        name = f"job-{int(job_id)}.{fmt}"
        os.replace(self._part(job_id, fmt), self._final(name))
        return name

    def part_size(self, job_id: int, fmt: str) -> int | None:
        """How many bytes a job's part file holds; None when it has none (nothing to resume)."""
        path = self._part(job_id, fmt)
        return path.stat().st_size if path.exists() else None

    def discard_part(self, job_id: int, fmt: str) -> None:
        self._part(job_id, fmt).unlink(missing_ok=True)

    def open(self, name: str) -> BinaryIO:
        return open(self._final(name), "rb")  # noqa: SIM115 (the response closes it)

    def size(self, name: str) -> int:
        return self._final(name).stat().st_size

    def exists(self, name: str) -> bool:
        return self._final(name).exists()

    def delete(self, name: str) -> None:
        self._final(name).unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, int, float]]:
        """Every file in the folder as (name, size, modified time): for retention and disk use."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while we looked
                continue
            if path.is_file():
                found.append((path.name, stat.st_size, stat.st_mtime))
        return found

    def used_bytes(self) -> int:
        return sum(size for _name, size, _mtime in self.entries())
