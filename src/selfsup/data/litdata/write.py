"""``selfsup data optimize``: an image folder's splits written as LitData datasets of encoded images.

Each split of an image folder (``ROOT/<image>``, ``ROOT/<class>/<image>`` or ``ROOT/train/...``
with ``ROOT/val/...`` or ``test/``) becomes a LitData dataset (``selfsup.data.litdata.format``).
JPEG files are kept byte for byte where a decoder reads them as a viewer shows them (RGB or
gray, upright); other files, and images with a side above ``max_side``, are decoded as the
in-memory path decodes them and re-encoded (quality 95). Files that cannot be decoded are
skipped and named with the reason in ``OUT/bad_files.txt``, as the in-memory path does.
Without a val/test split, a seeded ``val_fraction`` of the images is written as ``val``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser
from PIL import Image

from selfsup import SelfsupError
from selfsup.config import ConfigErrorMixin
from selfsup.data.decode import available_cores, to_rgb, why_unreadable
from selfsup.data.folders import LabelChoice, folder_splits, resolve_labels, scan_folder
from selfsup.data.litdata.format import META_NAME, _litdata, labels_name
from selfsup.data.report import write_bad_files
from selfsup.data.splits import held_out_split


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
            # Pillow sets Image.BICUBIC at import, from its enums, and types only those (Image.Resampling,
            # which needs Pillow 9.1).
            rgb.thumbnail((max_side, max_side), Image.BICUBIC)  # type: ignore[attr-defined]
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=95)
        w, h = rgb.size
        return {"image": out.getvalue(), "label": label, "height": h, "width": w}
    except Exception as e:  # any undecodable file: named, skipped
        with open(Path(bad_dir) / f"{os.getpid()}.txt", "a") as f:
            f.write(f"{path}\t{why_unreadable(path, e)}\n")
        return None


def optimize_split(
    files: Sequence[Path],
    labels: Sequence[int],
    out: Path,
    max_side: int | None,
    workers: int,
    bad: list[tuple[str, str]],
) -> int:
    """Write ``files`` (with ``labels``) as a LitData dataset in ``out``; append the files that
    could not be decoded to ``bad``; return how many samples were written."""
    litdata = _litdata()
    # Stored in a seeded random order: LitData fills each chunk from consecutive inputs and a
    # folder lists one class after another, so chunks (and the batches read from them) would
    # each hold one class. The labels files record the stored order.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as bad_dir:
        litdata.optimize(
            fn=partial(encode_sample, max_side=max_side, bad_dir=bad_dir),
            inputs=[(str(files[i]), int(labels[i])) for i in order],
            output_dir=str(out),
            chunk_bytes="64MB",
            num_workers=max(1, min(workers, len(files))),
            mode="overwrite",
            start_method="fork" if os.name == "posix" else None,
        )
        for part in sorted(Path(bad_dir).glob("*.txt")):
            lines = [line.split("\t", 1) for line in part.read_text().splitlines() if line]
            bad += [(path, why) for path, why in lines]
    return len(litdata.StreamingDataset(str(out)))


def stored_labels(directory: Path) -> list[int]:
    """The labels of a written split in stored order (LitData's writers interleave their
    inputs), read once so that training can look a row's label up without reading the row."""
    ds = _litdata().StreamingDataset(str(directory))
    return [int(ds[i]["label"]) for i in range(len(ds))]


def optimize_folder(
    src: str | Path,
    out: str | Path,
    max_side: int | None = None,
    workers: int | None = None,
    labels: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Every split of the folder ``src`` as a LitData dataset under ``out`` (see the module
    docstring); without a val/test split, a seeded ``val_fraction`` of the images is written as
    ``val`` instead of ``train`` (0: none). Returns what ``OUT/selfsup.json`` records."""
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
    if not 0 <= val_fraction < 1:
        raise SelfsupError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if eval_dir is None and val_fraction > 0:
        # Held apart once, here: every stage that streams this dataset evaluates on the same images.
        n = len(scan.files)
        kept_rows, held_rows = held_out_split(n, val_fraction, seed)
        held, kept = held_rows.sort().values.tolist(), kept_rows.sort().values.tolist()
        if not kept:
            raise SelfsupError(f"{train_dir} holds {n} image(s): too few to hold out {val_fraction:.0%}")
        splits = [
            ("train", [scan.files[i] for i in kept], [choice.labels[i] for i in kept]),
            ("val", [scan.files[i] for i in held], [choice.labels[i] for i in held]),
        ]
    if eval_dir is not None:
        ev = scan_folder(eval_dir)
        ev_choice = resolve_labels(
            ev, "folders" if choice.mode == "folders" else "none", choice.classes if choice.mode == "folders" else None
        )
        splits.append((eval_dir.name, ev.files, ev_choice.labels))
    out.mkdir(parents=True, exist_ok=True)
    bad: list[tuple[str, str]] = []
    counts = {}
    for name, files, ys in splits:
        where = eval_dir if eval_dir is not None and name != "train" else train_dir
        held_note = f" (held out: {val_fraction:.0%})" if eval_dir is None and name == "val" else ""
        print(f"selfsup data optimize: {name}: {len(files):,} files of {where}{held_note}", flush=True)
        counts[name] = {"found": len(files), "written": optimize_split(files, ys, out / name, max_side, workers, bad)}
        if choice.mode == "folders":
            (out / labels_name(name)).write_text(json.dumps(stored_labels(out / name)) + "\n")
    meta = {
        "source": str(src.resolve()),
        "labels": choice.mode,
        "classes": choice.classes,
        "splits": counts,
        "max_side": max_side,
        "skipped": len(bad),
        "held_out": val_fraction if eval_dir is None else None,
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    bad_path = write_bad_files(out, sorted(bad))
    if bad_path is not None:
        print(f"selfsup data optimize: {len(bad)} unreadable files skipped, listed in {bad_path}", flush=True)
    return meta


class DataParser(ConfigErrorMixin, ArgumentParser):
    """``selfsup data``'s parser; errors become one-line SelfsupErrors."""


def build_parser() -> ArgumentParser:
    """``selfsup data optimize --src ROOT --out DIR [--max-side N] [--workers N] [--labels ...]``."""
    p = DataParser(prog="selfsup data", description="image collections as LitData datasets", default_meta=False)
    sub = p.add_subcommands(dest="command", required=True)
    op = DataParser(
        prog="selfsup data optimize",
        default_meta=False,
        description="write an image folder's splits as LitData chunks of encoded images",
    )
    op.add_argument(
        "--src", type=str, required=True, help="the image folder (ROOT/<image>, ROOT/<class>/<image>, ROOT/train/...)"
    )
    op.add_argument(
        "--out", type=str, required=True, help="the output folder (local; LitData reads it from a bucket too)"
    )
    op.add_argument(
        "--max-side", type=int | None, default=None, help="re-encode images with a longer side, shrunk to it"
    )
    op.add_argument("--workers", type=int | None, default=None, help="processes (default: the usable cores)")
    op.add_argument("--labels", type=Literal["auto", "folders", "none"], default="auto", help="as data.labels")
    op.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="without a val/ or test/ split: the share of images written as 'val' (0: none)",
    )
    op.add_argument("--seed", type=int, default=0, help="of that split")
    sub.add_subcommand("optimize", op, help="write an image folder's splits as LitData chunks of encoded images")
    return p


def data_main(argv: Sequence[str]) -> dict[str, Any]:
    """``selfsup data optimize``: see :func:`build_parser`."""
    a = build_parser().parse_args(list(argv)).optimize
    meta = optimize_folder(a.src, a.out, a.max_side, a.workers, a.labels, a.val_fraction, a.seed)
    written = ", ".join(f"{k} {v['written']:,}" for k, v in meta["splits"].items())
    print(f"selfsup data optimize: wrote {written} images to {a.out} ({meta['labels']} labels)", flush=True)
    return meta
