"""The on-disk format of a dataset that ``selfsup data optimize`` writes.

``OUT/<split>/`` holds each split's LitData chunks, ``OUT/<split>_labels.json`` the labels in
stored order and ``OUT/selfsup.json`` the classes and counts. A sample is ``{"image": JPEG
bytes, "label": int (-1: unlabeled), "height": int, "width": int}`` (the original size, so that
a crop can later be drawn against it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from selfsup import SelfsupError

META_NAME = "selfsup.json"


def labels_name(split: str) -> str:
    """The file beside ``selfsup.json`` with a split's labels in stored order (JSON list)."""
    return f"{split}_labels.json"


def join_uri(root: str | Path, *parts: str) -> str:
    """``root/part/...`` for a local folder or a URI (s3://bucket/dir)."""
    return "/".join([str(root).rstrip("/"), *parts])


def _read_text(root: str | Path, name: str) -> str:
    """A small file of a dataset folder, local or in a bucket LitData reads."""
    uri = join_uri(root, name)
    if "://" not in str(root):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise SelfsupError(f"{path} not found: is {root} a folder written by selfsup data optimize?")
        return path.read_text()
    from litdata.streaming.fs_provider import _get_fs_provider  # optional extra: only for a bucket

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        _get_fs_provider(uri).download_file(uri, local)
        return Path(local).read_text()


def read_stream_meta(root: str | Path | None) -> dict[str, Any]:
    """``ROOT/selfsup.json`` of a dataset that ``selfsup data optimize`` wrote."""
    if root is None:
        raise SelfsupError("data.source=stream needs data.root: a folder written by selfsup data optimize")
    return json.loads(_read_text(root, META_NAME))


def read_stream_labels(root: str | Path, split: str) -> list[int]:
    """A split's labels in the order LitData stores its samples."""
    return json.loads(_read_text(root, labels_name(split)))


def _litdata() -> Any:
    try:
        import litdata  # optional extra: selfsup[stream]
    except ImportError:
        raise SelfsupError(
            "streaming datasets need LitData: pip install 'selfsup[stream]' (or pip install litdata)"
        ) from None
    return litdata
