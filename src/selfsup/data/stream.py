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

    selfsup data optimize --src ROOT --out DIR [--max-side 512] [--workers N] [--val-fraction 0.1]

``OUT/<split>/`` holds each split's chunks (``train``, and ROOT's own evaluation split or, without
one, a seeded ``--val-fraction`` held out as ``val``), ``OUT/<split>_labels.json`` the labels in
stored order and ``OUT/selfsup.json`` the classes and counts. The second half of this module is
what a loader worker makes of a stored sample for training (``data.source stream``, see
``selfsup.data.streaming``): crops cut from the full image, decoded at reduced size where the
crops allow, or left encoded for decoding on the device.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
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
    from litdata.streaming.fs_provider import _get_fs_provider

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
    # Stored in a seeded random order: LitData fills each chunk from consecutive inputs and a
    # folder lists one class after another, so chunks (and the batches read from them) would
    # each hold one class. The labels files record the stored order.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as bad_dir:
        litdata.optimize(fn=partial(encode_sample, max_side=max_side, bad_dir=bad_dir),
                         inputs=[(str(files[i]), int(labels[i])) for i in order],
                         output_dir=str(out), chunk_bytes="64MB", num_workers=max(1, min(workers, len(files))),
                         mode="overwrite", start_method="fork" if os.name == "posix" else None)
        for part in sorted(Path(bad_dir).glob("*.txt")):
            bad += [tuple(line.split("\t", 1)) for line in part.read_text().splitlines() if line]
    return len(litdata.StreamingDataset(str(out)))


def stored_labels(directory: Path) -> list[int]:
    """The labels of a written split in stored order (LitData's writers interleave their
    inputs), read once so that training can look a row's label up without reading the row."""
    ds = _litdata().StreamingDataset(str(directory))
    return [int(ds[i]["label"]) for i in range(len(ds))]


def optimize_folder(src: str | Path, out: str | Path, max_side: int | None = None, workers: int | None = None,
                    labels: str = "auto", val_fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
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
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held = perm[: max(1, round(val_fraction * n))].sort().values.tolist()
        kept = perm[len(held):].sort().values.tolist()
        if not kept:
            raise SelfsupError(f"{train_dir} holds {n} image(s): too few to hold out {val_fraction:.0%}")
        splits = [("train", [scan.files[i] for i in kept], [choice.labels[i] for i in kept]),
                  ("val", [scan.files[i] for i in held], [choice.labels[i] for i in held])]
    if eval_dir is not None:
        ev = scan_folder(eval_dir)
        ev_choice = resolve_labels(ev, "folders" if choice.mode == "folders" else "none",
                                   choice.classes if choice.mode == "folders" else None)
        splits.append((eval_dir.name, ev.files, ev_choice.labels))
    out.mkdir(parents=True, exist_ok=True)
    bad: list[tuple[str, str]] = []
    counts = {}
    for name, files, ys in splits:
        where = eval_dir if eval_dir is not None and name != "train" else train_dir
        held = f" (held out: {val_fraction:.0%})" if eval_dir is None and name == "val" else ""
        print(f"selfsup data optimize: {name}: {len(files):,} files of {where}{held}", flush=True)
        counts[name] = {"found": len(files), "written": optimize_split(files, ys, out / name, max_side, workers, bad)}
        if choice.mode == "folders":
            (out / labels_name(name)).write_text(json.dumps(stored_labels(out / name)) + "\n")
    meta = {"source": str(src.resolve()), "labels": choice.mode, "classes": choice.classes, "splits": counts,
            "max_side": max_side, "skipped": len(bad), "held_out": val_fraction if eval_dir is None else None}
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
    op.add_argument("--val-fraction", type=float, default=0.1,
                    help="without a val/ or test/ split: the share of images written as 'val' (0: none)")
    op.add_argument("--seed", type=int, default=0, help="of that split")
    a = ap.parse_args(list(argv))
    meta = optimize_folder(a.src, a.out, a.max_side, a.workers, a.labels, a.val_fraction, a.seed)
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
    "index": int}`` per sample; shuffled per epoch with ``shuffle``, sharded across ranks and
    workers by LitData."""
    from selfsup.data.streaming import StreamedDataset

    return StreamedDataset(str(directory), CentreImage(image_size), shuffle=shuffle, seed=seed)


def decode_crop(data: bytes, box: tuple[float, float, float, float], size: int, flip: bool = False) -> torch.Tensor:
    """Decode the region ``box`` = (x0, y0, w, h), in pixels of the full image, resized to
    ``size`` x ``size`` (bilinear, antialiased), flipped horizontally with ``flip``: RGB uint8
    (3, size, size). See :func:`decode_crops`."""
    return decode_crops(data, [box], size, [flip])[0]


def decode_crops(data: bytes, boxes: Sequence[tuple[float, float, float, float]], size: int,
                 flips: Sequence[bool]) -> torch.Tensor:
    """Several crops of one image from one decode: each ``box`` = (x0, y0, w, h), in pixels of
    the full image, resized to ``size`` x ``size`` (bilinear, antialiased) and flipped
    horizontally where ``flips`` says: RGB uint8 (n, 3, size, size).

    Only what the crops need is decoded: a JPEG at the smallest of libjpeg's 1/1, 1/2, 1/4, 1/8
    scales that keeps at least ``size`` pixels across every box (Pillow's ``draft``), so large
    crops of a large image cost a fraction of a full decode, and a small crop keeps the full
    resolution (SimCLR's 8% crops stay sharp)."""
    with Image.open(io.BytesIO(data)) as im:
        full_w, full_h = im.size
        # The decoded size keeps each box at least `size` pixels wide and high.
        need_w = max(math.ceil(full_w * size / max(b[2], 1e-6)) for b in boxes)
        need_h = max(math.ceil(full_h * size / max(b[3], 1e-6)) for b in boxes)
        im.draft("RGB", (need_w, need_h))
        s_x, s_y = im.size[0] / full_w, im.size[1] / full_h
        im = to_rgb(im)
        out = []
        for (x0, y0, bw, bh), flip in zip(boxes, flips, strict=True):
            region = (x0 * s_x, y0 * s_y, (x0 + bw) * s_x, (y0 + bh) * s_y)
            crop = im.resize((size, size), Image.BILINEAR, box=region, reducing_gap=None)
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(np.asarray(crop, dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def random_crops(data: bytes, height: int, width: int, n: int, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random resized crops of one encoded image, each box drawn against the image's own
    ``height`` x ``width`` as torchvision's RandomResizedCrop draws it (:func:`crop_boxes`), then
    decoded together by :func:`decode_crops`: uint8 (n, 3, size, size). The views of SimCLR and MoCo cut
    from the full image, for the colour and blur steps to follow batched on the device."""
    return CropViews(n, size, tuple(scale), tuple(ratio), flip_p).cut(data, height, width, generator)


# -- what a worker makes of one stored sample ----------------------------------------------
def centre_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The centred square of side min(H, W): (x0, y0, side, side)."""
    side = min(height, width)
    return ((width - side) // 2, (height - side) // 2, side, side)


@dataclass(frozen=True)
class CentreImage:
    """The image's shorter side resized to ``size`` and a centre square cut: ``image`` uint8
    (3, S, S), as the in-memory path stores images (``size`` None: the whole image)."""

    size: int | None
    key = "image"

    def boxes(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([centre_box(height, width)], dtype=torch.float), torch.zeros(1, dtype=torch.bool)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": decode_sample(sample["image"], self.size), "label": sample["label"]}


@dataclass(frozen=True)
class CropViews:
    """``n`` random resized crops, each drawn against the image's own size and decoded from the
    full image (:func:`random_crops`), flipped with ``flip_p``: ``views`` uint8 (n, 3, S, S).
    SimCLR's and MoCo's crop step, moved into the workers; colour and blur follow batched on
    the device."""

    n: int
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    key = "views"

    def boxes(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 4) boxes (x0, y0, w, h) as torchvision's RandomResizedCrop draws them, and flips."""
        boxes = crop_boxes(self.n, height, width, self.scale, self.ratio, generator)
        return boxes, torch.rand(self.n, generator=generator) < self.flip_p

    def cut(self, data: bytes, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The ``n`` crops of one encoded image of ``height`` x ``width``: uint8 (n, 3, S, S)."""
        boxes, flips = self.boxes(height, width, generator)
        return decode_crops(data, [tuple(b) for b in boxes.tolist()], self.size, flips.tolist())

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"views": self.cut(sample["image"], int(sample["height"]), int(sample["width"])), "label": sample["label"]}


@dataclass(frozen=True)
class RandomSquare:
    """A square of side min(H, W) at a random place in the full image, decoded at ``size``:
    ``image`` uint8 (3, S, S). Relative location's grid is then drawn inside it on the device,
    so that across epochs every part of a non-square image gets a grid."""

    size: int
    key = "image"

    def boxes(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        side = min(height, width)
        x0, y0 = torch.randint(0, width - side + 1, ()).item(), torch.randint(0, height - side + 1, ()).item()
        return torch.tensor([[x0, y0, side, side]], dtype=torch.float), torch.zeros(1, dtype=torch.bool)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        boxes, _ = self.boxes(int(sample["height"]), int(sample["width"]))
        return {"image": decode_crops(sample["image"], [tuple(boxes[0].tolist())], self.size, [False])[0],
                "label": sample["label"]}


@dataclass(frozen=True)
class LabelOnly:
    """Only the label (no decoding): for a probe that trains on features cached by row."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"label": sample["label"]}


@dataclass(frozen=True)
class Undecoded:
    """The workers' half of decoding on the training device: ``inner``'s boxes drawn against the
    image's own size, the JPEG left encoded (``jpeg``: its bytes as uint8 (L,); ``boxes`` (n, 4);
    ``flips`` (n,)). :func:`decode_batch_on_device` makes ``inner``'s output from them."""

    inner: CentreImage | CropViews | RandomSquare

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        boxes, flips = self.inner.boxes(int(sample["height"]), int(sample["width"]))
        return {"jpeg": torch.frombuffer(bytearray(sample["image"]), dtype=torch.uint8), "boxes": boxes,
                "flips": flips, "label": sample["label"]}


def collate_undecoded(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples, keeping the encoded images (different lengths) a list."""
    from torch.utils.data import default_collate

    if not samples or "jpeg" not in samples[0]:
        return default_collate(samples)
    jpegs = [s.pop("jpeg") for s in samples]
    return {**default_collate(samples), "jpeg": jpegs}


def decode_batch_on_device(batch: dict[str, Any], sample_fn: CentreImage | CropViews | RandomSquare,
                           device: torch.device) -> dict[str, Any]:
    """Decode a batch of :class:`Undecoded` samples on ``device`` (torchvision's batched
    ``decode_jpeg``: nvJPEG on a GPU) and cut their boxes there, resized to ``sample_fn.size``
    (bilinear, antialiased) and flipped: the batch ``sample_fn`` would have made in the workers,
    ``views`` uint8 (B, n, 3, S, S) or ``image`` (B, 3, S, S), on ``device``."""
    images = decode_jpeg(batch.pop("jpeg"), mode=ImageReadMode.RGB, device=device)
    boxes, flips = batch.pop("boxes").round().long().tolist(), batch.pop("flips").tolist()
    size = sample_fn.size
    out = []
    for img, img_boxes, img_flips in zip(images, boxes, flips, strict=True):
        crops = []
        for (x0, y0, w, h), flip in zip(img_boxes, img_flips, strict=True):
            crop = TF.resized_crop(img, y0, x0, h, w, [size, size], antialias=True)
            crops.append(crop.flip(-1) if flip else crop)
        out.append(torch.stack(crops))
    stacked = torch.stack(out)
    batch[sample_fn.key] = stacked if sample_fn.key == "views" else stacked[:, 0]
    return batch


SampleFn = Callable[[dict[str, Any]], dict[str, Any]]
