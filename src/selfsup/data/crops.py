"""Crop boxes and sampling grids in plain torch: where a view or a stored image is cut.

Boxes are drawn as torchvision's ``RandomResizedCrop`` draws them, for a whole batch at once;
the views (``selfsup.data.views``) sample them on the device, the streamed dataset's workers
(``selfsup.data.litdata.samples``) decode them from the full image.
"""

from __future__ import annotations

import math

import torch


def uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n,) uniform [0, 1) on the generator's device, moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gdev).to(device)


def crop_boxes(
    b: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    attempts: int = 10,
) -> torch.Tensor:
    """Random crop boxes drawn as torchvision's ``RandomResizedCrop.get_params`` draws them, for
    a whole batch at once: area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``, up to ``attempts`` tries for a box that fits, else the largest centered box
    with the aspect ratio clamped to ``ratio``; the position uniform over where the box fits.

    Returns:
        (b, 4) float boxes (x0, y0, w, h) in pixels (continuous, not rounded).
    """
    dev = torch.device(device)
    area = height * width
    u = uniform(b * attempts * 4, generator, dev).view(b, attempts, 4)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    r = torch.exp(log_r)
    w = torch.sqrt(target * r).round()  # torchvision rounds the sides to whole pixels
    h = torch.sqrt(target / r).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1, device=dev))
    pick = first.clamp(min=0)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    # Position: integer offsets uniform over 0..W-w (torchvision: randint(0, W - w + 1)).
    x0 = torch.floor(u[..., 2].gather(1, pick)[:, 0] * (width - w + 1))
    y0 = torch.floor(u[..., 3].gather(1, pick)[:, 0] * (height - h + 1))
    # No attempt fitted: the whole image, cut to the nearest allowed aspect ratio, centered.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    none = first < 0
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    x0 = torch.where(none, torch.full_like(x0, (width - fw) // 2), x0)
    y0 = torch.where(none, torch.full_like(y0, (height - fh) // 2), y0)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_grid(boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """grid_sample's grid (B, S, S, 2) that resizes each box (B, 4: x0, y0, w, h in pixels) of a
    ``height`` x ``width`` image to ``size`` x ``size``, mirrored where ``flip`` (B,) bool."""
    x0, y0, bw, bh = boxes.unbind(1)
    b = len(boxes)
    sign = 1.0 - 2.0 * flip.to(boxes.dtype)
    # The box in grid_sample's [-1, 1] coordinates (align_corners=False: pixel edges at +-1).
    # The grid is separable (x depends on the column only, y on the row), so it is built by
    # broadcasting instead of affine_grid's batched matrix product.
    base = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) * 2 + 1) / size - 1  # output pixel centers
    gx = (bw / width * sign)[:, None] * base[None] + ((2 * x0 + bw) / width - 1)[:, None]  # (B, S)
    gy = (bh / height)[:, None] * base[None] + ((2 * y0 + bh) / height - 1)[:, None]
    return torch.stack([gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], dim=-1)


# -- what a worker makes of one stored sample ----------------------------------------------
def center_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The centered square of side min(H, W): (x0, y0, side, side)."""
    side = min(height, width)
    return ((width - side) // 2, (height - side) // 2, side, side)
