"""Batched image augmentation on the training device (SimCLR recipe, Chen et al. 2020, App. A).

All random parameters are drawn per image in one call each, and every operation acts on the
whole batch at once, so augmentation keeps pace with the model instead of starving it in
per-sample DataLoader workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: ImageNet channel statistics, the usual choice for natural images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LUMA = (0.299, 0.587, 0.114)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n,) uniform [0, 1) on the generator's device, moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gdev).to(device)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, H, W) in [0, 1]; floats pass through."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """Per-channel standardisation of (B, 3, H, W) floats in [0, 1]."""
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box of each image (area fraction in ``scale``, aspect in ``ratio``),
    resize it to ``size`` x ``size`` bilinearly and flip it horizontally with ``flip_p``.

    One affine ``grid_sample`` does crop, resize and flip together.
    Shapes: (B, C, H, W) float -> (B, C, size, size).
    """
    b, _, h, w = x.shape
    dev = x.device
    area = scale[0] + (scale[1] - scale[0]) * _rand(b, generator, dev)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(b, generator, dev)
    r = torch.exp(log_r)
    # Box sides as fractions of the image side (torchvision clips the same way after retries).
    bw = torch.sqrt(area * r).clamp(max=1.0)
    bh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - bw) * (2 * _rand(b, generator, dev) - 1)  # box centre in [-1, 1] coordinates
    cy = (1 - bh) * (2 * _rand(b, generator, dev) - 1)
    flip = torch.where(_rand(b, generator, dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = bw * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = bh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue jitter, applied with probability ``p``.

    Factors are drawn from [1 - s, 1 + s]; hue rotates chroma in YIQ space by up to
    ``hue`` of a full turn. Order is fixed (brightness, contrast, saturation, hue).
    Shapes: (B, 3, H, W) floats in [0, 1] -> same.
    """
    b, dev = x.shape[0], x.device

    def factor(s: float) -> torch.Tensor:
        return (1 - s + 2 * s * _rand(b, generator, dev)).view(b, 1, 1, 1)

    apply = (_rand(b, generator, dev) < p).view(b, 1, 1, 1)
    y = (x * factor(brightness)).clamp(0, 1)
    mean = grayscale(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * factor(contrast) + mean).clamp(0, 1)
    gray = grayscale(y)
    y = ((y - gray) * factor(saturation) + gray).clamp(0, 1)
    if hue > 0:
        angle = (2 * _rand(b, generator, dev) - 1) * hue * 2 * math.pi
        y = _rotate_hue(y, angle).clamp(0, 1)
    return torch.where(apply, y, x)


_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the (I, Q) chroma plane by ``angle`` (B,) radians."""
    m = x.new_tensor(_RGB2YIQ)
    minv = torch.linalg.inv(m)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = c, -s
    rot[:, 2, 1], rot[:, 2, 2] = s, c
    t = minv @ rot @ m  # (B, 3, 3) per-image colour transform
    return torch.einsum("bij,bjhw->bihw", t, x)


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace an image by its luma (in all 3 channels) with probability ``p``."""
    apply = (_rand(x.shape[0], generator, x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, grayscale(x).expand_as(x), x)


def random_gaussian_blur(
    x: torch.Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Blur with a per-image sigma (kernel ~10% of the image side), with probability ``p``.

    A separable depthwise convolution with one kernel per image (grouped conv).
    """
    b, c, h, w = x.shape
    dev = x.device
    radius = max(1, int(0.05 * min(h, w)))
    s = sigma[0] + (sigma[1] - sigma[0]) * _rand(b, generator, dev)
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (B, 2r+1)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c).reshape(b, c, h, w)
    apply = (_rand(b, generator, dev) < p).view(b, 1, 1, 1)
    return torch.where(apply, y, x)


class SimCLRViews(nn.Module):
    """Two independently augmented, normalised views of a uint8 image batch.

    Recipe (SimCLR): random resized crop with scale (0.08, 1) and a horizontal flip, colour
    jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2, Gaussian blur with p=0.5
    for images above 32 pixels, then channel normalisation.

    Args:
        image_size: side S of the output views.
        blur: None means on for images larger than 32 pixels.
    Shapes:
        (B, 3, H, W) uint8 on any device -> two (B, 3, S, S) float tensors.
    """

    def __init__(
        self,
        image_size: int = 32,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter_strength: float = 1.0,
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur: bool | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.jitter = tuple(v * jitter_strength for v in (0.4, 0.4, 0.4, 0.1))
        self.jitter_p = jitter_p
        self.gray_p = gray_p
        self.blur = image_size > 32 if blur is None else blur
        self.mean, self.std = tuple(mean), tuple(std)

    def view(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented view: (B, 3, H, W) uint8 -> (B, 3, S, S) float, normalised."""
        x = to_float(images)
        x = random_resized_crop(x, self.image_size, self.scale, self.ratio, generator=generator)
        b, c, s, h = self.jitter
        x = color_jitter(x, b, c, s, h, p=self.jitter_p, generator=generator)
        x = random_grayscale(x, self.gray_p, generator=generator)
        if self.blur:
            x = random_gaussian_blur(x, generator=generator)
        return normalize(x, self.mean, self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(images, generator), self.view(images, generator)
