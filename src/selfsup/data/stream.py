"""Image collections as LitData datasets: ``selfsup data optimize`` and reading them back.

``optimize_folder`` writes each split of an image folder (``ROOT/<image>``, ``ROOT/<class>/<image>``
or ``ROOT/train/...`` with ``ROOT/val/...`` or ``test/``) as a LitData dataset of encoded images,
the first step towards collections larger than memory (issue: "Collections larger than memory").
A sample is ``{"image": JPEG bytes, "label": int (-1: unlabeled), "height": int, "width": int}``
(the original size, so that a crop can later be drawn against it). JPEG files are kept byte for
byte where a decoder reads them as a viewer shows them (RGB or grey, upright); other files, and
images with a side above ``max_side``, are decoded as the in-memory path decodes them and
re-encoded (quality 95). Files that cannot be decoded are skipped and named with the reason in
``OUT/bad_files.txt``, as the in-memory path does.

    selfsup data optimize --src ROOT --out DIR [--max-side 512] [--workers N]

``OUT/<split>/`` holds each split's chunks (``train``, and ``val`` where ROOT has an evaluation
split) and ``OUT/selfsup.json`` the classes and counts.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from selfsup import SelfsupError
from selfsup.data.decode import available_cores, to_rgb, why_unreadable
from selfsup.data.sources import LabelChoice, folder_splits, resolve_labels, scan_folder
from selfsup.data.views import crop_boxes

META_NAME = "selfsup.json"
BAD_FILES_NAME = "bad_files.txt"


def _litdata() -> Any:
    try:
        import litdata
    except ImportError:
        raise SelfsupError("streaming datasets need LitData: pip install 'selfsup[stream]' (or pip install litdata)") from None
    return litdata


def encode_sample(item: tuple[str, int], max_side: int | None, bad_dir: str) -> dict[str, Any] | None:
    """One file -> a sample (see the module docstring), or None after naming it in ``bad_dir``
    when it cannot be decoded. Runs in LitData's worker processes."""
    path, label = item
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            upright = im.getexif().get(0x0112, 1) == 1  # EXIF orientation: a decoder ignores it
            keep = im.format == "JPEG" and im.mode in ("RGB", "L") and upright
            im.load()  # the whole file decodes (a truncated JPEG fails here, not in training)
            w, h = im.size
            if keep and (max_side is None or max(w, h) <= max_side):
                return {"image": data, "label": label, "height": h, "width": w}
            rgb = to_rgb(im)
        if max_side is not None and max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=95)
        w, h = rgb.size
        return {"image": out.getvalue(), "label": label, "height": h, "width": w}
    except Exception as e:  # any undecodable file: named, skipped
        with open(Path(bad_dir) / f"{os.getpid()}.txt", "a") as f:
            f.write(f"{path}\t{why_unreadable(path, e)}\n")
        return None


@dataclass
class OptimizedSplit:
    """What ``optimize_folder`` wrote for one split."""

    name: str
    directory: Path
    found: int
    written: int


def optimize_split(files: Sequence[Path], labels: Sequence[int], out: Path, max_side: int | None, workers: int,
                   bad: list[tuple[str, str]]) -> int:
    """Write ``files`` (with ``labels``) as a LitData dataset in ``out``; append the files that
    could not be decoded to ``bad``; return how many samples were written."""
    litdata = _litdata()
    with tempfile.TemporaryDirectory() as bad_dir:
        litdata.optimize(fn=partial(encode_sample, max_side=max_side, bad_dir=bad_dir),
                         inputs=[(str(f), int(y)) for f, y in zip(files, labels, strict=True)],
                         output_dir=str(out), chunk_bytes="64MB", num_workers=max(1, min(workers, len(files))),
                         mode="overwrite", start_method="fork" if os.name == "posix" else None)
        for part in sorted(Path(bad_dir).glob("*.txt")):
            bad += [tuple(line.split("\t", 1)) for line in part.read_text().splitlines() if line]
    return len(litdata.StreamingDataset(str(out)))


def optimize_folder(src: str | Path, out: str | Path, max_side: int | None = None, workers: int | None = None,
                    labels: str = "auto") -> dict[str, Any]:
    """Every split of the folder ``src`` as a LitData dataset under ``out`` (see the module
    docstring); returns what ``OUT/selfsup.json`` records."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise SelfsupError(f"--src not found: {src}")
    if max_side is not None and max_side < 8:
        raise SelfsupError(f"--max-side must be at least 8 pixels, got {max_side}")
    workers = workers or available_cores()
    train_dir, eval_dir = folder_splits(src)
    scan = scan_folder(train_dir)
    if not scan.files:
        raise SelfsupError(f"no images found under {train_dir}")
    choice: LabelChoice = resolve_labels(scan, labels)  # type: ignore[arg-type]
    splits = [("train", scan.files, choice.labels)]
    if eval_dir is not None:
        ev = scan_folder(eval_dir)
        ev_choice = resolve_labels(ev, "folders" if choice.mode == "folders" else "none",
                                   choice.classes if choice.mode == "folders" else None)
        splits.append((eval_dir.name, ev.files, ev_choice.labels))
    out.mkdir(parents=True, exist_ok=True)
    bad: list[tuple[str, str]] = []
    counts = {}
    for name, files, ys in splits:
        print(f"selfsup data optimize: {name}: {len(files):,} files of {train_dir if name == 'train' else eval_dir}",
              flush=True)
        counts[name] = {"found": len(files), "written": optimize_split(files, ys, out / name, max_side, workers, bad)}
    meta = {"source": str(src.resolve()), "labels": choice.mode, "classes": choice.classes, "splits": counts,
            "max_side": max_side, "skipped": len(bad)}
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    bad_path = out / BAD_FILES_NAME
    if bad:
        bad_path.write_text("".join(f"{p}\t{why}\n" for p, why in sorted(bad)))
        print(f"selfsup data optimize: {len(bad)} unreadable files skipped, listed in {bad_path}", flush=True)
    else:
        bad_path.unlink(missing_ok=True)
    return meta


def data_main(argv: Sequence[str]) -> dict[str, Any]:
    """``selfsup data optimize --src ROOT --out DIR [--max-side N] [--workers N] [--labels auto|folders|none]``."""
    ap = argparse.ArgumentParser(prog="selfsup data", description="image collections as LitData datasets")
    sub = ap.add_subparsers(dest="command", required=True)
    op = sub.add_parser("optimize", help="write an image folder's splits as LitData chunks of encoded images")
    op.add_argument("--src", required=True, help="the image folder (ROOT/<image>, ROOT/<class>/<image>, ROOT/train/...)")
    op.add_argument("--out", required=True, help="the output folder (local; LitData reads it from a bucket too)")
    op.add_argument("--max-side", type=int, default=None, help="re-encode images with a longer side, shrunk to it")
    op.add_argument("--workers", type=int, default=None, help="processes (default: the usable cores)")
    op.add_argument("--labels", default="auto", choices=["auto", "folders", "none"], help="as data.labels")
    a = ap.parse_args(list(argv))
    meta = optimize_folder(a.src, a.out, a.max_side, a.workers, a.labels)
    written = ", ".join(f"{k} {v['written']:,}" for k, v in meta["splits"].items())
    print(f"selfsup data optimize: wrote {written} images to {a.out} ({meta['labels']} labels)", flush=True)
    return meta


def decode_sample(data: bytes, image_size: int | None) -> torch.Tensor:
    """JPEG bytes -> RGB uint8 (3, H, W); with ``image_size``, the shorter side resized to it
    (bilinear, antialiased) and a centre square cut, as the in-memory path stores images."""
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if image_size is None:
        return img
    img = TF.resize(img, image_size, antialias=True)
    return TF.center_crop(img, [image_size, image_size])


def streamed_images(directory: str | Path, image_size: int | None = None, shuffle: bool = False, seed: int = 0) -> Any:
    """A LitData ``StreamingDataset`` over a split that :func:`optimize_folder` wrote (a local
    folder or a URI LitData reads), giving ``{"image": uint8 (3, S, S), "label": int,
    "height": int, "width": int}`` per sample; shuffled per epoch with ``shuffle``, sharded across
    ranks and workers by LitData."""
    litdata = _litdata()

    class StreamedImages(litdata.StreamingDataset):
        def __getitem__(self, index: Any) -> dict[str, Any]:
            sample = super().__getitem__(index)
            return {**sample, "image": decode_sample(sample["image"], image_size)}

    return StreamedImages(str(directory), shuffle=shuffle, seed=seed)


def decode_crop(data: bytes, box: tuple[float, float, float, float], size: int, flip: bool = False) -> torch.Tensor:
    """Decode the region ``box`` = (x0, y0, w, h), in pixels of the full image, resized to
    ``size`` x ``size`` (bilinear, antialiased), flipped horizontally with ``flip``: RGB uint8
    (3, size, size). Only what the crop needs is decoded: a JPEG at the smallest of libjpeg's
    1/1, 1/2, 1/4, 1/8 scales that keeps at least ``size`` pixels across the box (Pillow's
    ``draft``), so a large crop of a large image costs a fraction of a full decode, and a small
    crop keeps the full resolution (SimCLR's 8% crops stay sharp)."""
    x0, y0, bw, bh = box
    with Image.open(io.BytesIO(data)) as im:
        full_w, full_h = im.size
        # The decoded size keeps the box at least `size` pixels wide and high.
        need = (math.ceil(full_w * size / max(bw, 1e-6)), math.ceil(full_h * size / max(bh, 1e-6)))
        im.draft("RGB", need)
        s_x, s_y = im.size[0] / full_w, im.size[1] / full_h
        im = to_rgb(im)
        region = (x0 * s_x, y0 * s_y, (x0 + bw) * s_x, (y0 + bh) * s_y)
        out = im.resize((size, size), Image.BILINEAR, box=region, reducing_gap=None)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def random_crops(data: bytes, height: int, width: int, n: int, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random resized crops of one encoded image, each box drawn against the image's own
    ``height`` x ``width`` as torchvision's RandomResizedCrop draws it (:func:`crop_boxes`), then
    decoded by :func:`decode_crop`: uint8 (n, 3, size, size). The views of SimCLR and MoCo cut
    from the full image, for the colour and blur steps to follow batched on the device."""
    boxes = crop_boxes(n, height, width, scale, ratio, generator)
    flips = torch.rand(n, generator=generator) < flip_p
    return torch.stack([decode_crop(data, tuple(b.tolist()), size, bool(f)) for b, f in zip(boxes, flips, strict=True)])
