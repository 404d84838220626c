"""Augmentation per CPU core: batched SimCLR views against per-sample torchvision.

Both make two SimCLR views per image (random resized crop (0.08, 1), flip, color jitter
(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, normalize) from the embedded CIFAR-10 sample,
side by side in one run:

- per-sample: torchvision transforms on PIL images inside DataLoader workers (one core per
  worker), the way most SSL code feeds a GPU;
- batched: ``selfsup.data.views.SimCLRViews`` on whole uint8 batches, torch on one thread.

    python -m benchmarks augment [--workers 2] [--images 4000] [--json FILE]

Prints images per second per CPU core for each and their ratio. The batched measurement
(:func:`views_rate`) and the per-sample pipeline are the ones ``lightly``, ``stream`` and ``gpu`` use too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from benchmarks.common import parser, seconds_per_call, torch_threads, write_json
from selfsup.data.sources import load_sample_split
from selfsup.data.views import IMAGENET_MEAN, IMAGENET_STD, SimCLRViews


# -- per sample: PIL and torchvision ---------------------------------------------------------------
def per_sample_transform(size: int) -> T.Compose:
    """One SimCLR view of a PIL image, as lightly and solo-learn build it with torchvision."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoViews:
    """A per-sample transform applied twice: SimCLR's two views of one image."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)


class PilImages(Dataset):
    """PIL images through a transform, each with the label 0 (the benchmarks train without labels)."""

    def __init__(self, images: list[Image.Image], transform: Callable[[Image.Image], Any]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.images[i]), 0


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (N, 3, H, W) images as PIL images, what a per-sample pipeline starts from."""
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]


def per_sample_rate(images: list[Image.Image], size: int, workers: int, batch: int) -> float:
    """Images per second of two views each through a DataLoader (all ``workers`` together; 0: this process,
    on one thread); the first batch, which starts the workers, is not timed."""
    loader = DataLoader(
        PilImages(images, TwoViews(per_sample_transform(size))), batch, shuffle=True, num_workers=workers
    )
    with torch_threads(1):
        it = iter(loader)
        next(it)
        t0, n = time.perf_counter(), 0
        for (v0, _), _ in it:
            n += len(v0)
        return n / (time.perf_counter() - t0)


# -- batched: SimCLRViews ----------------------------------------------------------------------------
def views_rate(
    images: torch.Tensor,
    size: int | None,
    batch: int,
    repeats: int,
    blur: bool | None = None,
    compile: bool = False,
    threads: int | None = 1,
) -> float:
    """Images per second of ``SimCLRViews`` (``blur`` and ``compile`` as it takes them) on ``images`` in
    batches of ``batch``, on their device, ``repeats`` passes after two warm-up calls (compiling happens
    there); on ``threads`` torch threads (None: as they are), restored afterwards."""
    with torch_threads(threads):
        views = SimCLRViews(size, blur=blur, compile=compile)
        views(images[:batch])
        views(images[: batch // 2 + 1])  # compiled: the batch size marked dynamic before the clock
        starts = range(0, len(images) - batch + 1, batch)

        def one_pass() -> None:
            for i in starts:
                views(images[i : i + batch])

        return len(starts) * batch / seconds_per_call(one_pass, repeats=repeats, device=images.device)


def main(argv: list[str]) -> dict[str, Any]:
    """Measure both pipelines on the embedded sample and print (and with ``--json`` write) their rates."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (= cores) of the per-sample pipeline")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    images = load_sample_split("train", None).images[: args.images]
    pils = pil_images(images)
    size = images.shape[-1]
    ps = per_sample_rate(pils, size, args.workers, args.batch)
    ps1 = per_sample_rate(pils, size, 0, args.batch)
    bt = views_rate(images, size, args.batch, repeats=3)
    per_core = ps / max(1, args.workers)
    print(f"per-sample PIL + torchvision, {args.workers} workers: {ps:,.0f} images/s ({per_core:,.0f} per core)")
    print(f"per-sample PIL + torchvision, main process:  {ps1:,.0f} images/s (1 core)")
    print(f"batched SimCLRViews, 1 thread:              {bt:,.0f} images/s (1 core)")
    print(f"ratio per core: {bt / per_core:.1f}x against the workers, {bt / ps1:.1f}x against the main process")
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "per_sample_images_per_s": ps,
        "per_sample_images_per_s_per_core": per_core,
        "per_sample_main_process_images_per_s": ps1,
        "batched_images_per_s": bt,
        "ratio_per_core": bt / per_core,
    }
    return write_json(args.json, result)
