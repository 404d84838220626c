"""Relative patch location sampling (Doersch, Gupta and Efros 2015), batched in plain torch.

Geometry, per axis, for a 3x3 grid of square patches of side ``patch``:

    cell   = patch + jitter + gap        (pitch between neighboring cells)
    extent = 2 * cell + patch + jitter   (span of the whole grid)

The grid starts at a random offset inside the image; each patch sits at a random offset in
[0, jitter] inside its cell, drawn independently per patch and per axis. Two neighboring
patches are therefore separated by at least ``gap`` and at most ``gap + 2 * jitter`` pixels,
never overlap, and every patch lies inside the image. Doersch's 96-pixel patches with gap 48
and jitter +-7 are ``patch=96, jitter=14, gap=34`` here (cell 144); Kolesnikov et al.'s 85-pixel
cells with 64-pixel patches jittered by up to 21 are ``patch=64, jitter=21, gap=0``.

Labels of the 8 neighbors, fixed (reading order around the center C):

    0 1 2
    3 C 4
    5 6 7
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Grid cell k = 3 * row + col; the center is cell 4 and is never a label.
CENTER = 4
NEIGHBORS = (0, 1, 2, 3, 5, 6, 7, 8)


@dataclass(frozen=True)
class GridSpec:
    """Patch side, gap between neighboring cells and jitter range, in pixels.

    With ``gap_max`` the gap is drawn per image, uniformly from ``gap..gap_max``.
    """

    patch: int
    gap: int
    jitter: int
    gap_max: int | None = None

    def __post_init__(self) -> None:
        if self.patch < 1 or self.gap < 0 or self.jitter < 0 or (self.gap_max is not None and self.gap_max < self.gap):
            raise ValueError(f"invalid grid {self}: need patch >= 1, 0 <= gap <= gap_max, jitter >= 0")

    @property
    def cell(self) -> int:
        """Cell pitch at the largest gap."""
        return self.patch + self.jitter + (self.gap if self.gap_max is None else self.gap_max)

    @property
    def extent(self) -> int:
        """Span of the grid at the largest gap."""
        return 2 * self.cell + self.patch + self.jitter


#: Presets scaled from the literature to image sides 32, 64, 96 and 160 (the grid filling the
#: image). ``doersch``: Doersch et al.'s proportions, 96-px patches with a nominal gap of 48
#: and jitter +-7 (here gap 34..62 px, i.e. gap = patch/3 and jitter = patch/7 scaled).
#: ``kolesnikov``: Kolesnikov et al. / mmselfsup, 85-px cells holding 64-px patches at a random
#: offset (gap 0, jitter = a quarter cell: neighbors 0..42 px apart).
GRID_PRESETS: dict[str, dict[int, GridSpec]] = {
    "doersch": {
        32: GridSpec(patch=7, gap=3, jitter=1),  # cell 11, extent 30
        64: GridSpec(patch=15, gap=5, jitter=2),  # cell 22, extent 61
        96: GridSpec(patch=22, gap=8, jitter=3),  # cell 33, extent 91
        160: GridSpec(patch=38, gap=14, jitter=5),  # cell 57, extent 157
    },
    "kolesnikov": {
        32: GridSpec(patch=8, gap=0, jitter=2),  # cell 10, extent 30
        64: GridSpec(patch=16, gap=0, jitter=5),  # cell 21, extent 63
        96: GridSpec(patch=24, gap=0, jitter=8),  # cell 32, extent 96
        160: GridSpec(patch=40, gap=0, jitter=13),  # cell 53, extent 159
    },
}


def grid_preset(image_size: int, style: str = "doersch") -> GridSpec:
    """The largest preset of ``style`` whose grid fits into an image of side ``image_size``."""
    if style not in GRID_PRESETS:
        raise ValueError(f"unknown grid style {style!r}; choose from {', '.join(GRID_PRESETS)}")
    fitting = [s for s in GRID_PRESETS[style] if s <= image_size]
    if not fitting:
        raise ValueError(f"no patch-grid preset fits {image_size}-pixel images (smallest is 32)")
    return GRID_PRESETS[style][max(fitting)]


def sample_grid(
    batch: int, height: int, width: int, spec: GridSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Top-left corners of the 9 patches of each image.

    Returns:
        (batch, 9, 2) int64 tensor of (y, x), cell k = 3 * row + col, on the generator's device.
    """
    if spec.extent > min(height, width):
        raise ValueError(
            f"a patch grid of extent {spec.extent} (patch {spec.patch}, gap {spec.gap}, jitter {spec.jitter}) "
            f"does not fit into {height}x{width} images"
        )
    device = generator.device if generator is not None else torch.device("cpu")
    gap_max = spec.gap if spec.gap_max is None else spec.gap_max
    gap = torch.randint(spec.gap, gap_max + 1, (batch, 1), generator=generator, device=device)
    cell = spec.patch + spec.jitter + gap  # (B, 1): per-image pitch
    extent = 2 * cell + spec.patch + spec.jitter
    # Origins uniform over the positions where this image's grid fits.
    u = torch.rand(batch, 2, generator=generator, device=device)
    origin_y = (u[:, :1] * (height - extent + 1)).floor().long()
    origin_x = (u[:, 1:] * (width - extent + 1)).floor().long()
    jitter = torch.randint(0, spec.jitter + 1, (batch, 9, 2), generator=generator, device=device)
    k = torch.arange(9, device=device)
    y = origin_y + (k // 3) * cell + jitter[..., 0]
    x = origin_x + (k % 3) * cell + jitter[..., 1]
    return torch.stack([y, x], dim=-1)


def extract_patches(images: torch.Tensor, corners: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut square patches with no Python loop over images.

    ``unfold`` views every ``patch`` x ``patch`` window of the batch without copying; one
    advanced-indexing call with a (B, K) index then copies out the chosen windows.

    Args:
        images: (B, C, H, W), any dtype.
        corners: (B, K, 2) top-left (y, x) of each patch.
    Returns:
        (B, K, C, patch, patch), same dtype as ``images``.
    """
    corners = corners.to(images.device)
    windows = images.unfold(2, patch, 1).unfold(3, patch, 1)  # (B, C, H-p+1, W-p+1, p, p), a view
    bidx = torch.arange(images.shape[0], device=images.device)[:, None]
    return windows[bidx, :, corners[..., 0], corners[..., 1]]


def sample_patches(
    images: torch.Tensor, spec: GridSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a 3x3 grid per image and cut its patches.

    Returns:
        patches (B, 9, C, p, p) and corners (B, 9, 2).
    """
    b, _, h, w = images.shape
    corners = sample_grid(b, h, w, spec, generator)
    return extract_patches(images, corners, spec.patch), corners


def normalize_patches(patches: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each patch to zero mean and unit variance over its pixels and channels.

    Removes patch-level brightness and contrast, a low-level cue the network could use to
    match neighbors (Doersch 2015; Kolesnikov et al. 2019 use per-image standardization).
    Shapes: (..., C, p, p) -> same.
    """
    x = patches.reshape(*patches.shape[:-3], -1)
    # One new tensor, then in-place passes over contiguous rows: several times faster on the
    # CPU than var_mean over three dimensions, and no large temporaries to allocate.
    flat = x.to(torch.float32, copy=True)  # never modifies the caller's tensor
    flat.sub_(flat.mean(dim=-1, keepdim=True))
    var = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square_().div_(flat.shape[-1])
    return flat.mul_(var.add_(eps).rsqrt_()).view(patches.shape)


def color_drop(patches: torch.Tensor, generator: torch.Generator | None = None, noise: float = 0.01) -> torch.Tensor:
    """Doersch's remedy for chromatic aberration: keep one random channel of each patch and
    replace the other two by that channel's mean plus Gaussian noise of ``noise`` times its
    standard deviation. Shapes: float (..., 3, p, p) -> same."""
    lead = patches.shape[:-3]
    flat = patches.reshape(-1, *patches.shape[-3:])
    n, dev = flat.shape[0], flat.device
    gdev = generator.device if generator is not None else dev
    keep = torch.randint(0, flat.shape[1], (n,), generator=generator, device=gdev).to(dev)
    kept = flat[torch.arange(n, device=dev), keep]  # (n, p, p)
    mean = kept.mean(dim=(-2, -1), keepdim=True)
    std = kept.std(dim=(-2, -1), keepdim=True)
    fill = mean[:, None] + noise * std[:, None] * torch.randn(flat.shape, generator=generator, device=gdev).to(dev)
    is_kept = (torch.arange(flat.shape[1], device=dev)[None] == keep[:, None]).view(n, -1, 1, 1)
    return torch.where(is_kept, flat, fill).reshape(*lead, *patches.shape[-3:])


def pixelate(
    patches: torch.Tensor,
    p: float = 1 / 3,
    min_fraction: float = 0.1,
    buckets: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """With probability ``p`` per patch, downsample to a random side between ``min_fraction``
    and 1 of the patch and upsample back (Doersch: 10..95 px for 96-px patches), so the network
    cannot rely on fine texture alone. Sides come from ``buckets`` levels, one resize call per
    level rather than per patch. Shapes: float (..., C, s, s) -> same."""
    lead = patches.shape[:-3]
    flat = patches.reshape(-1, *patches.shape[-3:])
    n, side, dev = flat.shape[0], flat.shape[-1], flat.device
    gdev = generator.device if generator is not None else dev
    apply = (torch.rand(n, generator=generator, device=gdev) < p).to(dev)
    level = torch.randint(0, buckets, (n,), generator=generator, device=gdev).to(dev)
    sizes = torch.linspace(max(1.0, min_fraction * side), side - 1, buckets).round().long().tolist()
    out = flat.clone()
    for b, small in enumerate(sizes):
        idx = (apply & (level == b)).nonzero().flatten()
        if len(idx):
            low = F.interpolate(flat[idx], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
            out[idx] = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *patches.shape[-3:])


def random_grayscale_images(
    images: torch.Tensor, p: float = 0.66, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Kolesnikov et al.'s remedy: whole images to gray (mean of RGB) with probability ``p``.
    Shapes: (B, 3, H, W) -> same shape and dtype (integer images are rounded)."""
    x = images.float()
    gdev = generator.device if generator is not None else x.device
    apply = (torch.rand(x.shape[0], generator=generator, device=gdev) < p).to(x.device).view(-1, 1, 1, 1)
    out = torch.where(apply, x.mean(dim=1, keepdim=True).expand_as(x), x)
    return out if images.is_floating_point() else out.round().to(images.dtype)


def pair_labels(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels 0..7 for the 8 (center, neighbor) pairs of each image, image-major: (batch * 8,)."""
    return torch.arange(8, device=device).repeat(batch)
