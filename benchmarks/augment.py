"""Augmentation throughput: batched SimCLR views on the device vs the usual per-sample pipeline.

Both make two SimCLR views per image (random resized crop (0.08, 1), flip, colour jitter
(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, normalise) from the embedded CIFAR-10 sample,
side by side in one run:

- per-sample: torchvision transforms on PIL images inside DataLoader workers (one core per
  worker), the way most SSL code feeds a GPU;
- batched: ``selfsup.data.views.SimCLRViews`` on whole uint8 batches, torch on one thread.

    python scripts/bench_augment.py [--workers 2] [--images 4000]

Prints images per second per CPU core for each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from selfsup.data.sources import load_sample_split
from selfsup.data.views import IMAGENET_MEAN, IMAGENET_STD, SimCLRViews


def per_sample_transform(size: int) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViews(Dataset):
    def __init__(self, images: list[Image.Image], size: int) -> None:
        self.images, self.t = images, per_sample_transform(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t(self.images[i]), self.t(self.images[i])


def per_sample(pil: list[Image.Image], size: int, workers: int, batch: int) -> float:
    """Images per second through the DataLoader (all workers together)."""
    torch.set_num_threads(1)
    loader = DataLoader(TwoViews(pil, size), batch_size=batch, num_workers=workers, shuffle=True)
    it = iter(loader)
    next(it)  # start the workers before the clock
    t, n = time.perf_counter(), 0
    for v0, _ in it:
        n += v0.shape[0]
    return n / (time.perf_counter() - t)


def batched(images: torch.Tensor, size: int, batch: int, repeats: int, blur: bool | None = None,
            compile: bool = False) -> float:
    """Images per second of SimCLRViews on one thread (``blur`` and ``compile`` as SimCLRViews
    takes them; compiling happens in the warm-up); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        views = SimCLRViews(size, blur=blur, compile=compile)
        views(images[:batch])  # warm-up
        views(images[: batch // 2 + 1])  # compiled: the batch size marked dynamic before the clock
        t, n = time.perf_counter(), 0
        for _ in range(repeats):
            for i in range(0, len(images) - batch + 1, batch):
                views(images[i : i + batch])
                n += batch
        return n / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (= cores) of the per-sample pipeline")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    s = load_sample_split("train", None)
    images = s.images[: args.images]
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    size = images.shape[-1]
    ps = per_sample(pil, size, args.workers, args.batch)
    ps1 = per_sample(pil, size, 0, args.batch)
    bt = batched(images, size, args.batch, repeats=3)
    per_core = ps / max(1, args.workers)
    print(f"per-sample PIL + torchvision, {args.workers} workers: {ps:,.0f} images/s ({per_core:,.0f} per core)")
    print(f"per-sample PIL + torchvision, main process:  {ps1:,.0f} images/s (1 core)")
    print(f"batched SimCLRViews, 1 thread:              {bt:,.0f} images/s (1 core)")
    print(f"ratio per core: {bt / per_core:.1f}x against the workers, {bt / ps1:.1f}x against the main process")


if __name__ == "__main__":
    main()
