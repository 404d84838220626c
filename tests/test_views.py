"""Batched SimCLR views on the device."""

from __future__ import annotations

import torch

from selfsup.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimCLRViews,
    color_jitter,
    random_resized_crop,
)


def test_views_shapes_and_seeding() -> None:
    imgs = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    views = SimCLRViews(image_size=24)
    a0, a1 = views(imgs, torch.Generator().manual_seed(0))
    b0, b1 = views(imgs, torch.Generator().manual_seed(0))
    assert a0.shape == a1.shape == (16, 3, 24, 24) and a0.dtype == torch.float32
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert not torch.allclose(a0, a1)  # the two views differ
    # Per-image parameters: images differ in how they were cropped, not only in content.
    same = imgs[:1].expand(16, -1, -1, -1)
    v, _ = views(same, torch.Generator().manual_seed(1))
    assert (v - v[:1]).abs().flatten(1).amax(1)[1:].min() > 0


def test_full_crop_without_colour_ops_is_identity_up_to_normalisation() -> None:
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = imgs.float() / 255
    out = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(out, x, atol=1e-5)
    flipped = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    assert torch.equal(color_jitter(x, p=0.0), x)
    views = SimCLRViews(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur=False)
    v, _ = views(imgs)
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    back = v * s + m
    # Each image is either itself or its mirror image.
    per_image = [(torch.allclose(back[i], x[i], atol=1e-5) or torch.allclose(back[i], x[i].flip(-1), atol=1e-5)) for i in range(4)]
    assert all(per_image)
