"""Folders decoded once per job into uint8 tensors, cached on disk and shared by every process.

The decoded set is cached to a file keyed by the file list, sizes, modification times and the
target size; one process builds it while the others wait on a lock, and every process maps the
same file into memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from selfsup import SelfsupError
from selfsup.data.decode import decode_files
from selfsup.data.folders import FolderScan, LabelChoice
from selfsup.data.splits import ImageSet

try:
    import fcntl
except ImportError:  # no flock (Windows): concurrent builders only cost time
    fcntl = None  # type: ignore[assignment]


#: Bumped whenever decoding changes, so that old caches are not read.
CACHE_VERSION = "2"


def default_cache_dir() -> Path:
    base = os.environ.get("SELFSUP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "selfsup"
    )
    return Path(base)


# -- decoding, cached once per job ----------------------------------------------------------
@dataclass
class SplitReport:
    """What decoding a split found: ``found`` files chosen, ``used`` images decoded,
    ``skipped`` (relative path, reason) of those that could not be, ``smaller`` images that
    were upscaled to the target size, and whether this process decoded them or read the cache
    (``seconds`` of decoding, None when read)."""

    directory: str
    found: int
    used: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    smaller: int = 0
    seconds: float | None = None
    workers: int = 1


def _file_key(f: Path) -> str:
    try:
        st = f.stat()
    except OSError:  # a broken link: part of the key as it is
        return f"{f}|missing"
    return f"{f}|{st.st_size}|{st.st_mtime_ns}"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` across processes (and nodes sharing the filesystem)."""
    if fcntl is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        # mmap: every process of the job shares the file's pages instead of holding a copy.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a foreign or damaged file: rebuild it
        return None


def decode_split(
    scan: FolderScan,
    choice: LabelChoice,
    indices: Sequence[int] | None,
    image_size: int | None,
    cache_dir: Path | None,
    use_cache: bool,
    workers: int | None = None,
    desc: str = "decoding",
) -> tuple[ImageSet, SplitReport]:
    """Decode the files ``indices`` of ``scan`` (all when None) with their labels.

    With ``use_cache`` the result is stored in ``cache_dir`` under a key of the files, their
    sizes and modification times and the target size. The first process to need it builds it
    under a file lock, writes it atomically (a temporary file, then a rename) and the others
    wait, then read it: each image is decoded once per job, however many processes train.
    """
    idx = list(range(len(scan.files))) if indices is None else list(indices)
    files = [scan.files[i] for i in idx]
    rel = [scan.relative[i] for i in idx]
    labels = [choice.labels[i] for i in idx]

    def build() -> dict:
        t0 = time.perf_counter()
        bar = tqdm(total=len(files), desc=desc, unit="img", leave=False, mininterval=1.0)
        d = decode_files(files, image_size, workers, progress=bar.update)
        bar.close()
        if image_size is None:
            assert isinstance(d.images, list)  # without an image_size each image is its own array
            shapes = {a.shape for a in d.images}
            if len(shapes) > 1:
                raise SelfsupError(
                    f"{scan.directory}: images have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}, ...); "
                    "set data.image_size"
                )
            images = (
                torch.from_numpy(np.stack(d.images)).permute(0, 3, 1, 2).contiguous()
                if d.images
                else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
            )
        else:
            images = torch.from_numpy(d.images)
        return {
            "images": images,
            "labels": torch.tensor(labels, dtype=torch.long)[torch.from_numpy(d.ok)],
            "classes": choice.classes,
            "skipped": [rel[i] for i, _ in d.reasons],
            "reasons": [r for _, r in d.reasons],
            "smaller": int(d.smaller),
            "seconds": time.perf_counter() - t0,
            "workers": d.workers,
        }

    payload: dict | None = None
    if use_cache and cache_dir is not None:
        key_parts = [
            CACHE_VERSION,
            str(scan.directory.resolve()),
            str(image_size),
            ",".join(choice.classes),
            *map(_file_key, files),
            *map(str, labels),
        ]
        key = hashlib.sha1("\n".join(key_parts).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"{key}.pt"
        payload = _read_cache(path)
        if payload is None:
            with _exclusive(path.with_suffix(".lock")):
                payload = _read_cache(path)  # another process may have built it meanwhile
                if payload is None:
                    built = build()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    torch.save({k: v for k, v in built.items() if k not in ("seconds", "workers")}, tmp)
                    os.replace(tmp, path)  # atomic: no process ever reads a half-written cache
                    payload = _read_cache(path) or built  # mapped, so the pages are shared
                    payload["seconds"], payload["workers"] = built["seconds"], built["workers"]
    if payload is None:
        payload = build()
    report = SplitReport(
        str(scan.directory),
        len(files),
        len(payload["images"]),
        list(zip(payload["skipped"], payload["reasons"], strict=True)),
        int(payload["smaller"]),
        payload.get("seconds"),
        int(payload.get("workers", 1)),
    )
    return ImageSet(payload["images"], payload["labels"], list(payload["classes"])), report
