"""Files that could not be decoded: one list, one name, one writer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: The list of unreadable files (path, tab, reason; one a line) in a run or dataset folder.
BAD_FILES_NAME = "bad_files.txt"


def write_bad_files(folder: str | Path, bad: Sequence[tuple[str, str]]) -> Path | None:
    """Write ``bad`` ((path, reason) pairs) as ``folder/bad_files.txt``, or remove a stale list
    when there is nothing to name; the path written, or None."""
    path = Path(folder) / BAD_FILES_NAME
    if not bad:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p}\t{why}\n" for p, why in bad))
    return path
