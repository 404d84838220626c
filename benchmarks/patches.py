"""Relative location's speed: batched patches and 9-pass training against their baselines.

Both figures are measured in the same run as their baselines:

(a) Patch sampling with per-patch normalization: the batched sampler
    (``sample_patches`` + ``normalize_patches``: one indexing call and one normalization for
    the whole batch) against a per-image loop doing the same as a per-sample transform in a
    DataLoader worker does (mmselfsup's ``RandomPatchWithLabels``): draw the grid for the
    image, cut its 9 patches, convert and standardize each one.
(b) Pretext training: images per second of training steps with each of the 9 patches through
    the backbone once (``RelativeLocation``), against mmselfsup's layout that stacks the 8
    neighbors and the center repeated 8 times (16 backbone passes per image).

    python -m benchmarks patches [--image-size 64] [--batch 128] [--json FILE]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import parser, seconds_per_call, write_json
from selfsup.data.patches import GridSpec, grid_preset, normalize_patches, pair_labels, sample_grid, sample_patches
from selfsup.methods import RelativeLocation


def per_image_loop(images: torch.Tensor, spec: GridSpec, g: torch.Generator) -> torch.Tensor:
    """The per-sample way: each image's grid drawn, its 9 patches cut, converted and standardized one by one."""
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


def rate(fn: Callable[[], object], count: int, repeats: int, rounds: int = 5) -> float:
    """Items per second of ``fn`` (``count`` items a call): the best of ``rounds`` rounds of ``repeats`` calls."""
    return count / seconds_per_call(fn, repeats=repeats, rounds=rounds, warmup=1)


def bench_sampler(images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Patches per second: the batched sampler and normalization, and the per-image loop."""
    spec = grid_preset(images.shape[-1])
    b = images.shape[0]
    g = torch.Generator().manual_seed(0)
    # Per-patch standardization is scale-free: no need to divide by 255 first.
    batched = rate(lambda: normalize_patches(sample_patches(images, spec, g)[0]), 9 * b, repeats)
    loop = rate(lambda: per_image_loop(images, spec, g), 9 * b, max(1, repeats // 4))
    return batched, loop


def bench_training(images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Images per second of pretext training steps: each patch through the backbone once, and mmselfsup's 16."""
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

    def repeated() -> None:  # 16 passes: 8 neighbors and the center 8 times (mmselfsup)
        patches, _ = sample_patches(images, model.grid_spec(images.shape[-1]))
        x = normalize_patches(patches.float() / 255)
        neighbors = x[:, [0, 1, 2, 3, 5, 6, 7, 8]].flatten(0, 1)
        centers = x[:, 4:5].expand(-1, 8, -1, -1, -1).flatten(0, 1)
        f = model.backbone(torch.cat([neighbors, centers]))
        pairs = torch.cat([f[8 * b :], f[: 8 * b]], dim=1)
        loss = F.cross_entropy(model.head(pairs), pair_labels(b))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return rate(once, b, repeats, rounds=3), rate(repeated, b, repeats, rounds=3)


def main(argv: list[str]) -> dict[str, Any]:
    """Measure both figures on random images and print (and with ``--json`` write) them."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    batched, loop = bench_sampler(images, args.repeats * 4)
    print(f"(a) patches/s: batched sampler {batched:,.0f}, per-image loop {loop:,.0f}: {batched / loop:.1f}x")
    once, repeated = bench_training(images, args.repeats)
    print(
        f"(b) pretext training images/s: each patch once {once:,.1f}, center repeated 8x {repeated:,.1f}: "
        f"{once / repeated:.2f}x"
    )
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "sampler_patches_per_s": {"batched": batched, "per_image_loop": loop, "ratio": batched / loop},
        "training_images_per_s": {"each_patch_once": once, "center_repeated": repeated, "ratio": once / repeated},
    }
    return write_json(args.json, result)
