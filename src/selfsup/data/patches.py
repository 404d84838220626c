"""Relative patch location sampling (Doersch, Gupta and Efros 2015), batched in plain torch.

Geometry, per axis, for a 3x3 grid of square patches of side ``patch``:

    cell   = patch + jitter + gap        (pitch between neighbouring cells)
    extent = 2 * cell + patch + jitter   (span of the whole grid)

The grid starts at a random offset inside the image; each patch sits at a random offset in
[0, jitter] inside its cell, drawn independently per patch and per axis. Two neighbouring
patches are therefore separated by at least ``gap`` and at most ``gap + 2 * jitter`` pixels,
never overlap, and every patch lies inside the image. Doersch's 96-pixel patches with gap 48
and jitter +-7 are ``patch=96, jitter=14, gap=34`` here (cell 144); Kolesnikov et al.'s 85-pixel
cells with 64-pixel patches jittered by up to 21 are ``patch=64, jitter=21, gap=0``.

Labels of the 8 neighbours, fixed (reading order around the centre C):

    0 1 2
    3 C 4
    5 6 7
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Grid cell k = 3 * row + col; the centre is cell 4 and is never a label.
CENTRE = 4
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
#: label of the neighbour at (row, col) of the 3x3 grid
LABEL_OF_CELL = {(k // 3, k % 3): label for label, k in enumerate(NEIGHBOURS)}


@dataclass(frozen=True)
class GridSpec:
    """Patch side, minimum gap between neighbouring patches, and jitter range, in pixels."""

    patch: int
    gap: int
    jitter: int

    def __post_init__(self) -> None:
        if self.patch < 1 or self.gap < 0 or self.jitter < 0:
            raise ValueError(f"invalid grid {self}: need patch >= 1, gap >= 0, jitter >= 0")

    @property
    def cell(self) -> int:
        return self.patch + self.jitter + self.gap

    @property
    def extent(self) -> int:
        return 2 * self.cell + self.patch + self.jitter


#: Presets scaled down from Doersch (patch ~ image/3, gap ~ patch/2) and Kolesnikov
#: (cells of image/3, patch = 3/4 of a cell) to small images; keys are image sides.
GRID_PRESETS: dict[int, GridSpec] = {
    32: GridSpec(patch=8, gap=2, jitter=1),  # extent 31
    64: GridSpec(patch=16, gap=2, jitter=3),  # cells of 21 px, extent 61
    96: GridSpec(patch=24, gap=3, jitter=5),  # extent 93
    160: GridSpec(patch=40, gap=5, jitter=8),  # extent 154
}


def grid_preset(image_size: int) -> GridSpec:
    """The largest preset whose grid fits into an image of side ``image_size``."""
    fitting = [s for s in GRID_PRESETS if s <= image_size]
    if not fitting:
        raise ValueError(f"no patch-grid preset fits {image_size}-pixel images (smallest is 32)")
    return GRID_PRESETS[max(fitting)]


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
    origin_y = torch.randint(0, height - spec.extent + 1, (batch, 1), generator=generator, device=device)
    origin_x = torch.randint(0, width - spec.extent + 1, (batch, 1), generator=generator, device=device)
    jitter = torch.randint(0, spec.jitter + 1, (batch, 9, 2), generator=generator, device=device)
    k = torch.arange(9, device=device)
    y = origin_y + (k // 3) * spec.cell + jitter[..., 0]
    x = origin_x + (k % 3) * spec.cell + jitter[..., 1]
    return torch.stack([y, x], dim=-1)


def extract_patches(images: torch.Tensor, corners: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut square patches by advanced indexing, with no Python loop over images.

    Args:
        images: (B, C, H, W), any dtype.
        corners: (B, K, 2) top-left (y, x) of each patch.
    Returns:
        (B, K, C, patch, patch), same dtype as ``images``.
    """
    corners = corners.to(images.device)
    b, k = corners.shape[:2]
    offs = torch.arange(patch, device=images.device)
    ys = (corners[..., 0, None] + offs)[:, :, :, None]  # (B, K, p, 1)
    xs = (corners[..., 1, None] + offs)[:, :, None, :]  # (B, K, 1, p)
    bidx = torch.arange(b, device=images.device)[:, None, None, None]
    out = images.permute(0, 2, 3, 1)[bidx, ys, xs]  # (B, K, p, p, C)
    return out.permute(0, 1, 4, 2, 3)


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
    match neighbours (Doersch 2015; Kolesnikov et al. 2019 use per-image standardisation).
    Shapes: (..., C, p, p) -> same.
    """
    x = patches.float()
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    var = x.var(dim=(-3, -2, -1), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def pair_labels(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels 0..7 for the 8 (centre, neighbour) pairs of each image, image-major: (batch * 8,)."""
    return torch.arange(8, device=device).repeat(batch)
