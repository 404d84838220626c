"""Masked image modelling in plain torch: patches, random masks and MAE's loss (He et al.,
"Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, section 3)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping square patches, row by row, each flattened as (p, p, C)
    as MAE's code orders it.

    Shapes: (B, C, H, W) -> (B, H/p * W/p, p * p * C)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"images of {h}x{w} pixels do not split into {p}x{p} patches")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of :func:`patchify` for a grid of (rows, columns) patches.

    Shapes: (B, rows * columns, p * p * C) -> (B, C, rows * p, columns * p)."""
    b = patches.shape[0]
    p, (gh, gw) = patch_size, grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


def random_masking(
    batch: int,
    tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hide ``int(tokens * mask_ratio)`` patches of each image, chosen uniformly and independently
    per image: a random permutation per image (the argsort of uniform noise, MAE's "random
    shuffle"), its first patches kept.

    Returns:
        keep: (B, K) long, the kept patches' indices in the order the encoder sees them;
        mask: (B, N) bool, True where a patch is hidden (exactly N - K per image);
        restore: (B, N) long, the permutation that puts the shuffled sequence back in order.
    """
    hidden = int(tokens * mask_ratio)
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, tokens, generator=generator, device=gen_device).to(device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, : tokens - hidden]
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, keep, False)
    return keep, mask, restore


def mae_loss(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Mean squared error of the predicted pixels of the hidden patches only; with ``norm_pix``
    each target patch is first normalised by its own mean and variance (MAE's better target).

    Shapes: prediction, target (B, N, D) patches; mask (B, N) bool, True where hidden -> a scalar.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (prediction - target).pow(2).mean(dim=-1)  # (B, N)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
