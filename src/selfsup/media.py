"""Pictures for people: grids of what the network sees, logged to W&B and saved as PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import write_png
from torchvision.utils import make_grid

from selfsup.data.views import IMAGENET_MEAN, IMAGENET_STD


def denormalize(x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """Normalised float (B, 3, H, W) -> uint8 for display."""
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def view_pairs_grid(images: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, scale: int = 3) -> torch.Tensor:
    """One column per image: the original (uint8), then its two normalised views.

    Returns uint8 (3, H, W), upscaled ``scale`` times (nearest) so 32-pixel images are visible.
    """
    size = v0.shape[-1]
    orig = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    rows = torch.cat([orig.round().clamp(0, 255).to(torch.uint8), denormalize(v0), denormalize(v1)])
    grid = make_grid(rows.cpu(), nrow=images.shape[0], padding=2, pad_value=255)
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def log_image(trainer, log_dir: str | None, key: str, image: torch.Tensor, caption: str = "") -> Path | None:
    """Log a uint8 (3, H, W) image to every W&B logger of ``trainer`` and save it as PNG in
    ``log_dir``; returns the PNG's path. Call on rank zero only; read ``trainer.log_dir`` on
    every rank beforehand (it is a collective call under DDP)."""
    from selfsup.tracking import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image.permute(1, 2, 0).numpy()], caption=[caption])
    if log_dir is None:
        return None
    path = Path(log_dir) / f"{key.replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.contiguous(), str(path))
    return path
