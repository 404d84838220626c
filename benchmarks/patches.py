"""Relative-location speed figures, each against its baseline in the same run.

(a) Patch sampling with per-patch normalisation: the batched sampler
    (``sample_patches`` + ``normalize_patches``: one indexing call and one normalisation for
    the whole batch) against a per-image loop doing the same as a per-sample transform in a
    DataLoader worker does (mmselfsup's ``RandomPatchWithLabels``): draw the grid for the
    image, cut its 9 patches, convert and standardise each one.
(b) Pretext training: images per second of training steps with each of the 9 patches through
    the backbone once (``RelativeLocation``), against mmselfsup's layout that stacks the 8
    neighbours and the centre repeated 8 times (16 backbone passes per image).

    python scripts/bench_patches.py [--image-size 64] [--batch 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from selfsup.data.patches import (
    grid_preset,
    normalize_patches,
    pair_labels,
    sample_grid,
    sample_patches,
)
from selfsup.methods import RelativeLocation


def per_image_loop(images: torch.Tensor, spec, g: torch.Generator) -> torch.Tensor:
    out = []
    h, w = images.shape[-2:]
    for img in images:
        corners = sample_grid(1, h, w, spec, g)[0].tolist()
        patches = []
        for y, x in corners:
            t = img[:, y : y + spec.patch, x : x + spec.patch].float() / 255
            patches.append((t - t.mean()) / t.std(unbiased=False).clamp_min(1e-5))
        out.append(torch.stack(patches))
    return torch.stack(out)


def rate(fn, count: int, repeats: int, rounds: int = 5) -> float:
    """Items per second: the best of ``rounds`` rounds of ``repeats`` calls (as timeit does,
    the best round is the one least disturbed by other work on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, time.perf_counter() - t)
    return count * repeats / best


def bench_sampler(images: torch.Tensor, repeats: int) -> tuple[float, float]:
    spec = grid_preset(images.shape[-1])
    b = images.shape[0]
    g = torch.Generator().manual_seed(0)
    # Per-patch standardisation is scale-free: no need to divide by 255 first.
    batched = rate(lambda: normalize_patches(sample_patches(images, spec, g)[0]), 9 * b, repeats)
    loop = rate(lambda: per_image_loop(images, spec, g), 9 * b, max(1, repeats // 4))
    return batched, loop


def bench_training(images: torch.Tensor, repeats: int) -> tuple[float, float]:
    model = RelativeLocation(backbone={"name": "small_cnn", "width": 32}, color="none", pixelate_p=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    b = images.shape[0]

    def once() -> None:  # 9 backbone passes per image
        logits, labels = model(images)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def repeated() -> None:  # 16 passes: 8 neighbours and the centre 8 times (mmselfsup)
        patches, _ = sample_patches(images, model.grid_spec(images.shape[-1]))
        x = normalize_patches(patches.float() / 255)
        neighbours = x[:, [0, 1, 2, 3, 5, 6, 7, 8]].flatten(0, 1)
        centres = x[:, 4:5].expand(-1, 8, -1, -1, -1).flatten(0, 1)
        f = model.backbone(torch.cat([neighbours, centres]))
        pairs = torch.cat([f[8 * b :], f[: 8 * b]], dim=1)
        loss = F.cross_entropy(model.head(pairs), pair_labels(b))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return rate(once, b, repeats, rounds=3), rate(repeated, b, repeats, rounds=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    batched, loop = bench_sampler(images, args.repeats * 4)
    print(f"(a) patches/s: batched sampler {batched:,.0f}, per-image loop {loop:,.0f}: {batched / loop:.1f}x")
    once, repeated = bench_training(images, args.repeats)
    print(f"(b) pretext training images/s: each patch once {once:,.1f}, centre repeated 8x {repeated:,.1f}: "
          f"{once / repeated:.2f}x")


if __name__ == "__main__":
    main()
