"""What a loader worker makes of one stored sample, as the training stage asks for it.

A center square (evaluation, probes), random resized crops cut from the full image (SimCLR,
MoCo; color and blur follow batched on the device), a random square of the full image for the
patch grid (relative location), the label only (a probe with cached features), or the boxes
alone with the JPEG left encoded, for decoding on the training device.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from selfsup.data.crops import center_box, crop_boxes
from selfsup.data.decode import to_rgb


def decode_sample(data: bytes, image_size: int | None) -> torch.Tensor:
    """JPEG bytes -> RGB uint8 (3, H, W); with ``image_size``, the shorter side resized to it
    (bilinear, antialiased) and a center square cut, as the in-memory path stores images."""
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if image_size is None:
        return img
    img = TF.resize(img, image_size, antialias=True)
    return TF.center_crop(img, [image_size, image_size])


def decode_crops(
    data: bytes, boxes: Sequence[tuple[float, float, float, float]], size: int, flips: Sequence[bool]
) -> torch.Tensor:
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
            # Pillow sets Image.BILINEAR and FLIP_LEFT_RIGHT at import, from its enums, and types only those
            # (Image.Resampling, Image.Transpose, which need Pillow 9.1).
            crop = im.resize((size, size), Image.BILINEAR, box=region, reducing_gap=None)  # type: ignore[attr-defined]
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)  # type: ignore[attr-defined]
            out.append(np.asarray(crop, dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class CenterImage:
    """The image's shorter side resized to ``size`` and a center square cut: ``image`` uint8
    (3, S, S), as the in-memory path stores images (``size`` None: the whole image)."""

    size: int | None
    key = "image"

    def boxes(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([center_box(height, width)], dtype=torch.float), torch.zeros(1, dtype=torch.bool)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": decode_sample(sample["image"], self.size), "label": sample["label"]}


@dataclass(frozen=True)
class CropViews:
    """``n`` random resized crops, each drawn against the image's own size and decoded from the
    full image (:meth:`cut`), flipped with ``flip_p``: ``views`` uint8 (n, 3, S, S).
    SimCLR's and MoCo's crop step, moved into the workers; color and blur follow batched on
    the device."""

    n: int
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    key = "views"

    @classmethod
    def of_views(cls, views: Any, image_size: int) -> CropViews:
        """The crop step of ``views`` (a ``SimCLRViews``) for a streamed dataset's workers: two
        crops of the full image at the view size (``image_size`` when the views keep the input
        size), with the views' scale and ratio."""
        return cls(2, views.image_size or image_size, tuple(views.scale), tuple(views.ratio))

    def boxes(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 4) boxes (x0, y0, w, h) as torchvision's RandomResizedCrop draws them, and flips."""
        boxes = crop_boxes(self.n, height, width, self.scale, self.ratio, generator)
        return boxes, torch.rand(self.n, generator=generator) < self.flip_p

    def cut(self, data: bytes, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The ``n`` crops of one encoded image of ``height`` x ``width``: uint8 (n, 3, S, S)."""
        boxes, flips = self.boxes(height, width, generator)
        return decode_crops(data, [tuple(b) for b in boxes.tolist()], self.size, flips.tolist())

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {
            "views": self.cut(sample["image"], int(sample["height"]), int(sample["width"])),
            "label": sample["label"],
        }


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
        return {
            "image": decode_crops(sample["image"], [tuple(boxes[0].tolist())], self.size, [False])[0],
            "label": sample["label"],
        }


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

    inner: CenterImage | CropViews | RandomSquare

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        boxes, flips = self.inner.boxes(int(sample["height"]), int(sample["width"]))
        return {
            "jpeg": torch.frombuffer(bytearray(sample["image"]), dtype=torch.uint8),
            "boxes": boxes,
            "flips": flips,
            "label": sample["label"],
        }


def collate_undecoded(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples, keeping the encoded images (different lengths) a list."""
    if not samples or "jpeg" not in samples[0]:
        return default_collate(samples)
    jpegs = [s.pop("jpeg") for s in samples]
    return {**default_collate(samples), "jpeg": jpegs}


def decode_batch_on_device(
    batch: dict[str, Any], sample_fn: CenterImage | CropViews | RandomSquare, device: torch.device
) -> dict[str, Any]:
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
