"""Patch-grid geometry: labels, bounds, gaps, overlap, normalisation, seeding."""

from __future__ import annotations

import pytest
import torch

from selfsup.data.patches import (
    GRID_PRESETS,
    LABEL_OF_CELL,
    GridSpec,
    extract_patches,
    grid_preset,
    normalize_patches,
    pair_labels,
    sample_grid,
    sample_patches,
)


def oracle(b: int, h: int, w: int) -> torch.Tensor:
    """Images whose channel 0 holds the row and channel 1 the column of each pixel."""
    ys = torch.arange(h).view(1, h, 1).expand(b, h, w)
    xs = torch.arange(w).view(1, 1, w).expand(b, h, w)
    img_id = torch.arange(b).view(b, 1, 1).expand(b, h, w)
    return torch.stack([ys, xs, img_id], dim=1).long()


def test_label_map_is_reading_order_around_centre() -> None:
    assert LABEL_OF_CELL == {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 3, (1, 2): 4, (2, 0): 5, (2, 1): 6, (2, 2): 7}
    assert pair_labels(2).tolist() == list(range(8)) * 2


@pytest.mark.parametrize("size", sorted(GRID_PRESETS))
def test_patches_come_from_their_cells_within_bounds(size: int) -> None:
    spec = grid_preset(size)
    b = 64
    g = torch.Generator().manual_seed(size)
    patches, corners = sample_patches(oracle(b, size, size), spec, g)  # (B, 9, 3, p, p)
    p = spec.patch
    assert patches.shape == (b, 9, 3, p, p)
    rows, cols, ids = patches[:, :, 0], patches[:, :, 1], patches[:, :, 2]
    # Every pixel comes from its own image and the patch is a contiguous square.
    assert (ids == torch.arange(b).view(b, 1, 1, 1)).all()
    top, left = rows[..., 0, 0], cols[..., 0, 0]
    assert (rows == top[..., None, None] + torch.arange(p).view(1, 1, p, 1)).all()
    assert (cols == left[..., None, None] + torch.arange(p).view(1, 1, 1, p)).all()
    assert torch.equal(torch.stack([top, left], -1), corners)
    # Inside the image.
    assert top.min() >= 0 and left.min() >= 0
    assert (top + p).max() <= size and (left + p).max() <= size
    # Cell k = 3 * row + col sits at that position of the grid relative to the centre (k = 4):
    # the label map's geometry is checked against the pixels themselves.
    for (r, c), label in LABEL_OF_CELL.items():
        k = 3 * r + c
        dy, dx = top[:, k] - top[:, 4], left[:, k] - left[:, 4]
        assert ((dy < 0) if r == 0 else (dy > 0) if r == 2 else (dy.abs() <= spec.jitter)).all(), label
        assert ((dx < 0) if c == 0 else (dx > 0) if c == 2 else (dx.abs() <= spec.jitter)).all(), label
    # Gap between horizontal and vertical neighbours within [gap, gap + 2 * jitter]: no overlap.
    tl = torch.stack([top, left], -1).view(b, 3, 3, 2)
    gaps_x = tl[:, :, 1:, 1] - tl[:, :, :-1, 1] - p
    gaps_y = tl[:, 1:, :, 0] - tl[:, :-1, :, 0] - p
    for gaps in (gaps_x, gaps_y):
        assert gaps.min() >= spec.gap and gaps.max() <= spec.gap + 2 * spec.jitter
    # Jitter: per image, the offsets of the 9 patches from their nominal cell positions
    # span at most ``jitter`` on each axis (the shared grid origin cancels), and they vary.
    cell = torch.arange(3) * spec.cell
    offs_y = (tl[..., 0] - cell.view(1, 3, 1)).flatten(1)
    offs_x = (tl[..., 1] - cell.view(1, 1, 3)).flatten(1)
    for offs in (offs_y, offs_x):
        spread = offs.max(1).values - offs.min(1).values
        assert spread.max() <= spec.jitter
        if spec.jitter > 0:
            assert spread.float().mean() > 0


def test_no_two_patches_overlap_in_any_image() -> None:
    spec = GridSpec(patch=10, gap=0, jitter=6)
    corners = sample_grid(200, 60, 60, spec, torch.Generator().manual_seed(0))
    y, x = corners[..., 0], corners[..., 1]
    for i in range(9):
        for j in range(i + 1, 9):
            sep_y = (y[:, i] - y[:, j]).abs() >= spec.patch
            sep_x = (x[:, i] - x[:, j]).abs() >= spec.patch
            assert (sep_y | sep_x).all(), (i, j)


def test_same_seed_same_patches_and_other_seed_differs() -> None:
    imgs = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8)
    spec = grid_preset(64)
    a, _ = sample_patches(imgs, spec, torch.Generator().manual_seed(3))
    b, _ = sample_patches(imgs, spec, torch.Generator().manual_seed(3))
    c, _ = sample_patches(imgs, spec, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_grid_too_large_fails_clearly() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        sample_grid(1, 30, 30, GridSpec(patch=12, gap=2, jitter=1), None)
    with pytest.raises(ValueError, match="no patch-grid preset"):
        grid_preset(16)


def test_per_patch_normalisation_gives_zero_mean_unit_variance() -> None:
    imgs = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    patches, _ = sample_patches(imgs, grid_preset(32), torch.Generator().manual_seed(0))
    z = normalize_patches(patches)
    flat = z.flatten(2)
    assert torch.allclose(flat.mean(-1), torch.zeros(4, 9), atol=1e-5)
    assert torch.allclose(flat.var(-1, unbiased=False), torch.ones(4, 9), atol=1e-3)


def test_extract_patches_keeps_dtype_and_values() -> None:
    imgs = torch.arange(2 * 3 * 10 * 10, dtype=torch.int32).view(2, 3, 10, 10)
    corners = torch.tensor([[[1, 2]], [[5, 0]]])
    out = extract_patches(imgs, corners, 4)
    assert out.dtype == imgs.dtype
    assert torch.equal(out[0, 0], imgs[0, :, 1:5, 2:6])
    assert torch.equal(out[1, 0], imgs[1, :, 5:9, 0:4])
