"""Decoding image files to RGB uint8 arrays: every mode Pillow reads, bad files named, all cores.

Plain Pillow and numpy (no torch, no Lightning), so that decoding worker processes start fast.

Conversions, chosen so that the pixels are what an image viewer shows:
- EXIF orientation is applied (a phone photo taken upright is upright);
- grayscale, palette, CMYK and YCbCr become RGB; 16-bit and 32-bit integer images are scaled
  to 8 bits (not clipped, which would turn most of them white);
- transparency (RGBA, LA, palette with a transparent color) is composited over white.

A file that Pillow cannot decode (truncated, empty, not an image, a decompression bomb) is
reported with a short reason instead of raising.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Formats Pillow registers for opening but cannot decode by itself (stubs that need a handler
# or an external program) are no images for us.
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"}


def image_extensions() -> tuple[str, ...]:
    """Lower-case file extensions (with the dot) of the formats this Pillow can decode."""
    Image.init()
    return tuple(
        sorted(
            ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in _UNDECODABLE
        )
    )


IMAGE_EXTENSIONS = image_extensions()


def is_image_name(name: str) -> bool:
    """Whether a file name is one we read: not hidden, with an extension Pillow decodes."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image -> RGB as a viewer shows it (see the module docstring)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        # 16-bit data (PNG, TIFF) span 0..65535; an "I" image holding 8-bit values stays as it is.
        scale = 257.0 if a.max(initial=0) > 255 else 1.0
        im = Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a  # float images in [0, 1] or [0, 255]
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _decode(path: str | Path | bytes, image_size: int | None) -> tuple[np.ndarray, int]:
    """(RGB uint8 (H, W, 3), shorter side of the file's image).

    JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, as Pillow's ``thumbnail``) when
    the image is at least twice as large as needed, keeping twice the target size so that the
    antialiased resize still has full detail.
    """
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
        side = min(im.size)
        if image_size is not None:
            im.draft(None, (2 * image_size, 2 * image_size))
        im = to_rgb(im)
        if image_size is not None and im.size != (image_size, image_size):
            w, h = im.size
            s = image_size / min(w, h)
            nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
            # Pillow sets Image.BICUBIC at import, from its enums, and types only those (Image.Resampling,
            # which needs Pillow 9.1).
            im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)  # type: ignore[attr-defined]
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im, dtype=np.uint8), side


def why_unreadable(path: str | Path | bytes, e: BaseException) -> str:
    """A short reason for a file that failed to decode."""
    if not isinstance(path, bytes) and os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(e, Image.DecompressionBombError):
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        over = f"{int(pixels.group(1)):,} pixels, " if pixels else ""
        limit = Image.MAX_IMAGE_PIXELS  # None turns the check, and so this error, off
        of = f" of {2 * limit:,}" if limit is not None else ""
        return f"decompression bomb ({over}over Pillow's limit{of})"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(e, FileNotFoundError):
        return "file not found (a broken link?)"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{type(e).__name__}: {msg}"


@dataclass
class Decoded:
    """Result of decoding a list of files.

    images: uint8 (N_ok, 3, H, W) with an ``image_size``, else a list of (H, W, 3) arrays;
    ok: bool (N,) which inputs decoded; reasons: (input index, reason) for the others;
    smaller: how many decoded images were smaller than ``image_size`` (so upscaled);
    workers: the processes that decoded them.
    """

    images: np.ndarray | list[np.ndarray]
    ok: np.ndarray
    reasons: list[tuple[int, str]] = field(default_factory=list)
    smaller: int = 0
    workers: int = 1


def _decode_chunk(items: Sequence[str | Path | bytes], image_size: int | None) -> Decoded:
    arrays, ok, reasons, smaller = [], np.zeros(len(items), dtype=bool), [], 0
    for i, item in enumerate(items):
        try:
            array, side = _decode(item, image_size)
        except Exception as e:  # any decoder failure is a bad file, named, never a traceback
            reasons.append((i, why_unreadable(item, e)))
            continue
        arrays.append(array)
        ok[i] = True
        smaller += image_size is not None and side < image_size
    if image_size is not None:  # channels first, as the DataModule stores images
        size = (0, 3, image_size, image_size)
        return Decoded(
            np.stack(arrays).transpose(0, 3, 1, 2) if arrays else np.zeros(size, np.uint8), ok, reasons, smaller
        )
    return Decoded(arrays, ok, reasons, smaller)


def available_cores() -> int:
    """CPU cores this process may use (SLURM and taskset restrict the affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decode_files(
    items: Sequence[str | Path | bytes],
    image_size: int | None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> Decoded:
    """Decode ``items`` (paths or encoded bytes) in ``workers`` processes, in order.

    Processes, not threads: measured on 2 cores, threads scale to 1.6x on 160-px JPEGs and get
    slower than one thread on 32-px ones, since Pillow holds the GIL in the Python-level parts
    of open, convert and resize (``python -m benchmarks decode``). ``workers`` None: every available
    core; 1 (or fewer than two chunks of work): decode in this process, with no start-up cost.
    ``progress(n)`` is called with the number of inputs finished after each chunk. With an
    ``image_size`` the images are written into one preallocated array as chunks arrive, so the
    peak memory is the decoded set plus a few chunks.
    """
    workers = min(workers or available_cores(), -(-len(items) // chunk))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    ok = np.zeros(len(items), dtype=bool)
    reasons: list[tuple[int, str]] = []
    smaller, filled = 0, 0
    out = np.empty((len(items), 3, image_size, image_size), np.uint8) if image_size is not None else None
    arrays: list[np.ndarray] = []

    def take(start: int, part: Decoded) -> None:
        nonlocal smaller, filled
        ok[start : start + len(part.ok)] = part.ok
        reasons.extend((start + i, r) for i, r in part.reasons)
        smaller += part.smaller
        if out is not None:  # file order is kept: decoded images are packed in order
            out[filled : filled + len(part.images)] = part.images
        else:
            arrays.extend(part.images)
        filled += len(part.images)
        if progress is not None:
            progress(len(part.ok))

    if workers <= 1:
        for k, c in enumerate(chunks):
            take(k * chunk, _decode_chunk(c, image_size))
    else:
        # fork: a spawned worker re-imports the main module (the CLI, so Lightning: seconds per
        # worker). The forked workers run only Pillow and numpy, as DataLoader workers do.
        ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_decode_chunk, c, image_size) for c in chunks]
            for k, f in enumerate(futures):
                take(k * chunk, f.result())
    return Decoded(out[:filled] if out is not None else arrays, ok, reasons, smaller, max(1, workers))
