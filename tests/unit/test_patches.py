"""Patch-grid geometry: labels, bounds, gaps, overlap, normalization, seeding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfsup.data.patches import (
    GRID_PRESETS,
    NEIGHBORS,
    GridSpec,
    color_drop,
    extract_patches,
    grid_preset,
    normalize_patches,
    pair_labels,
    pixelate,
    random_grayscale_images,
    sample_grid,
    sample_patches,
)

#: The label of the neighbor at (row, col) of the 3x3 grid, from the package's cell order.
LABEL_OF_CELL = {(k // 3, k % 3): label for label, k in enumerate(NEIGHBORS)}


def oracle(b: int, h: int, w: int) -> torch.Tensor:
    """Images whose channel 0 holds the row and channel 1 the column of each pixel."""
    ys = torch.arange(h).view(1, h, 1).expand(b, h, w)
    xs = torch.arange(w).view(1, 1, w).expand(b, h, w)
    img_id = torch.arange(b).view(b, 1, 1).expand(b, h, w)
    return torch.stack([ys, xs, img_id], dim=1).long()


def test_label_map_is_reading_order_around_center() -> None:
    assert LABEL_OF_CELL == {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 3, (1, 2): 4, (2, 0): 5, (2, 1): 6, (2, 2): 7}
    assert pair_labels(2).tolist() == list(range(8)) * 2


CASES = [(style, size) for style in GRID_PRESETS for size in GRID_PRESETS[style]]


@pytest.mark.parametrize(("style", "size"), CASES)
def test_patches_come_from_their_cells_within_bounds(style: str, size: int) -> None:
    spec = grid_preset(size, style)
    check_grid(spec, size)


def test_random_gap_varies_per_image_within_its_range() -> None:
    spec = GridSpec(patch=12, gap=0, jitter=3, gap_max=8)
    tl = check_grid(spec, 64)
    gaps = (tl[:, 1, 1, 1] - tl[:, 1, 0, 1] - spec.patch).float()
    assert gaps.std() > 1  # drawn per image


def check_grid(spec: GridSpec, size: int) -> torch.Tensor:
    """Check every geometric promise on an oracle batch; return the corners (B, 3, 3, 2)."""
    b = 64
    g = torch.Generator().manual_seed(size + spec.jitter)
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
    # Cell k = 3 * row + col sits at that position of the grid relative to the center (k = 4):
    # the label map's geometry is checked against the pixels themselves.
    for (r, c), label in LABEL_OF_CELL.items():
        k = 3 * r + c
        dy, dx = top[:, k] - top[:, 4], left[:, k] - left[:, 4]
        assert ((dy < 0) if r == 0 else (dy > 0) if r == 2 else (dy.abs() <= spec.jitter)).all(), label
        assert ((dx < 0) if c == 0 else (dx > 0) if c == 2 else (dx.abs() <= spec.jitter)).all(), label
    # Gap between horizontal and vertical neighbors within [gap, gap + 2 * jitter]: no overlap.
    tl = torch.stack([top, left], -1).view(b, 3, 3, 2)
    gaps_x = tl[:, :, 1:, 1] - tl[:, :, :-1, 1] - p
    gaps_y = tl[:, 1:, :, 0] - tl[:, :-1, :, 0] - p
    gap_max = spec.gap if spec.gap_max is None else spec.gap_max
    for gaps in (gaps_x, gaps_y):
        assert gaps.min() >= spec.gap and gaps.max() <= gap_max + 2 * spec.jitter
    # Jitter: per image, the offsets of the 9 patches from their nominal cell positions
    # span at most ``jitter`` on each axis (the shared grid origin cancels), and they vary.
    cell = torch.arange(3) * spec.cell
    offs_y = (tl[..., 0] - cell.view(1, 3, 1)).flatten(1)
    offs_x = (tl[..., 1] - cell.view(1, 1, 3)).flatten(1)
    if spec.gap_max is None:  # with a random gap the nominal cell differs per image
        for offs in (offs_y, offs_x):
            spread = offs.max(1).values - offs.min(1).values
            assert spread.max() <= spec.jitter
            if spec.jitter > 0:
                assert spread.float().mean() > 0
    return tl


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
    with pytest.raises(ValueError, match="unknown grid style"):
        grid_preset(64, "jigsaw")


def test_labels_are_uniform_over_the_eight_positions() -> None:
    from selfsup.methods import RelativeLocation

    imgs = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    counts_all = torch.bincount(pair_labels(400), minlength=8)
    assert counts_all.tolist() == [400] * 8
    one = RelativeLocation(backbone={"name": "small_cnn", "width": 4}, head_hidden=8, pairs="one")
    with torch.no_grad():
        _, labels = one(imgs, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels, minlength=8).float()
    # 400 draws over 8 labels: each near 50 (chi-square, 7 dof, p > 0.001 below 24.3).
    assert ((counts - 50) ** 2 / 50).sum() < 24.3 and counts.min() > 0


def test_color_drop_keeps_one_channel_per_patch() -> None:
    patches = torch.rand(6, 9, 3, 8, 8)
    out = color_drop(patches, torch.Generator().manual_seed(0))
    same = (out == patches).flatten(3).all(-1)  # (6, 9, 3): channel kept untouched
    assert (same.sum(-1) == 1).all()
    dropped = out[~same].flatten(1)
    assert dropped.std(1).max() < 0.01  # near-constant noise instead of the color


def test_pixelate_blurs_about_a_third_of_patches() -> None:
    patches = torch.rand(300, 3, 16, 16)
    out = pixelate(patches, p=1 / 3, generator=torch.Generator().manual_seed(0))
    changed = (out - patches).abs().flatten(1).amax(1) > 1e-6
    assert 70 < int(changed.sum()) < 130
    # Changed patches lost high-frequency detail: neighboring pixels closer together.
    tv = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert tv(out[changed]) < 0.7 * tv(patches[changed])
    assert out.shape == patches.shape


def test_grayscale_images_with_probability() -> None:
    imgs = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8)
    out = random_grayscale_images(imgs, p=0.66, generator=torch.Generator().manual_seed(0))
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 110 < int(gray.sum()) < 155


def test_per_patch_normalization_gives_zero_mean_unit_variance() -> None:
    imgs = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    patches, _ = sample_patches(imgs, grid_preset(32), torch.Generator().manual_seed(0))
    z = normalize_patches(patches)
    before = patches.float()
    z2 = normalize_patches(before)
    assert torch.equal(before, patches.float()) and torch.allclose(z, z2)  # input untouched
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


def test_patches_command_draws_grids(tmp_path: Path, image_folder: Path) -> None:
    from torchvision.io import read_image

    from selfsup.visualize import patches_main

    out = patches_main(
        [
            "--data.root",
            str(image_folder),
            "--count",
            "3",
            "--model.grid",
            "kolesnikov",
            "--model.color",
            "gray",
            "--out",
            str(tmp_path / "p.png"),
        ]
    )
    figure = read_image(str(out))
    # 3 columns of a 4x upscaled 32-px image with its 3x3 patch tile below it.
    assert figure.shape[0] == 3 and figure.shape[1] >= 2 * 4 * 32 and figure.shape[2] >= 3 * 4 * 32
    # The grid outlines use the label colors: the red of label 0 is present.
    red = (figure[0] > 200) & (figure[1] < 60) & (figure[2] < 100)
    assert int(red.sum()) > 20


def test_patches_command_reads_a_fit_config_and_the_command_line_overrides_it(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    """`selfsup patches --config configs/relative_location/cifar10.yaml` takes the fit config's
    model and data sections (its class_path and other sections are not the command's); an
    option given on the command line wins over the config's."""
    from selfsup.visualize import patches_main

    from conftest import REPO

    config = str(REPO / "configs/relative_location/cifar10.yaml")
    args = ["--config", config, "--data.root", str(image_folder), "--count", "2", "--out", str(tmp_path / "p.png")]
    patches_main(args)
    assert "32 px, patch 7, gap 3, jitter 1" in capsys.readouterr().out  # the config's Doersch grid
    patches_main([*args, "--model.grid", "kolesnikov"])
    assert "32 px, patch 8, gap 0, jitter 2" in capsys.readouterr().out
