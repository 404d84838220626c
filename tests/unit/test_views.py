"""Batched SimCLR views on the device."""

from __future__ import annotations

import torch

from selfsup import SelfsupError
from selfsup.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimCLRViews,
    ViewSpec,
    color_jitter,
    random_resized_crop,
    random_solarize,
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


def test_full_crop_without_color_ops_is_identity_up_to_normalization() -> None:
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
    per_image = [
        (torch.allclose(back[i], x[i], atol=1e-5) or torch.allclose(back[i], x[i].flip(-1), atol=1e-5))
        for i in range(4)
    ]
    assert all(per_image)


# -- against the torchvision transforms they replace ------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torchvision.transforms.v2 as T  # noqa: E402
import torchvision.transforms.v2.functional as TF  # noqa: E402

from selfsup.data.crops import crop_boxes  # noqa: E402
from selfsup.data.views import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation  # noqa: E402

from reference import ks_distance, ks_limit, rgb_to_hsv  # noqa: E402


@pytest.mark.parametrize(
    "ours, theirs, low, high",
    [
        (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_color_operations_equal_torchvision_per_image(ours, theirs, low: float, high: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 16, 16, generator=g)
    x[0] = 0.5  # a gray image: hue undefined, saturation 0
    f = low + (high - low) * torch.rand(12, generator=g)
    batched = ours(x, f)
    reference = torch.stack([theirs(x[i], float(f[i])) for i in range(12)])
    assert torch.allclose(batched, reference, atol=2e-5), (batched - reference).abs().max()


def test_hsv_round_trip_and_hue_of_primaries() -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    from reference import hsv_to_rgb

    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    primaries = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).view(3, 3, 1, 1)
    assert torch.allclose(rgb_to_hsv(primaries)[:, 0].flatten(), torch.tensor([0, 1 / 3, 2 / 3]), atol=1e-6)


def test_crop_parameters_follow_torchvision_random_resized_crop() -> None:
    """Area fraction, aspect ratio and position of the boxes: the same distributions as
    torchvision's RandomResizedCrop.get_params (4,000 draws each, on a wide 48 x 32 image, where
    some attempts do not fit and the fallback matters)."""
    n, h, w = 4000, 32, 48
    torch.manual_seed(0)
    ref = np.array(
        [T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=float,
    )  # (top, left, height, width)
    boxes = crop_boxes(n, h, w, generator=torch.Generator().manual_seed(1)).numpy()  # (x0, y0, w, h)
    ours = {
        "area": boxes[:, 2] * boxes[:, 3] / (h * w),
        "log_ratio": np.log(boxes[:, 2] / boxes[:, 3]),
        "cx": (boxes[:, 0] + boxes[:, 2] / 2) / w,
        "cy": (boxes[:, 1] + boxes[:, 3] / 2) / h,
    }
    theirs = {
        "area": ref[:, 2] * ref[:, 3] / (h * w),
        "log_ratio": np.log(ref[:, 3] / ref[:, 2]),
        "cx": (ref[:, 1] + ref[:, 3] / 2) / w,
        "cy": (ref[:, 0] + ref[:, 2] / 2) / h,
    }
    for key in ours:
        assert ks_distance(ours[key], theirs[key]) < ks_limit(n, n), key
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= h).all()


def test_hue_equals_torchvision_where_channels_tie() -> None:
    """8-bit images have many pixels whose largest channels are equal (and the primaries,
    secondaries, white and black): the hue shift there, of either sign, equals torchvision's."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 4, (10, 3, 12, 12), generator=g).float() / 3  # few levels: ties everywhere
    corners = torch.tensor([[r, gr, b] for r in (0.0, 1.0) for gr in (0.0, 1.0) for b in (0.0, 1.0)])
    x[0, :, :2, :4] = corners.T.reshape(3, 2, 4)
    f = torch.linspace(-0.5, 0.5, 10)
    ours = adjust_hue(x, f)
    reference = torch.stack([TF.adjust_hue(x[i], float(f[i])) for i in range(10)])
    assert torch.allclose(ours, reference, atol=2e-5), (ours - reference).abs().max()


def test_color_jitter_applies_each_images_operations_in_its_drawn_order() -> None:
    """Image by image, the batched jitter equals torchvision's four functions applied in the
    order and with the factors drawn for that image (the draws repeated from the same seed)."""
    b = 40
    x = torch.rand(b, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    ours = color_jitter(x, p=0.8, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # color_jitter's draws, in its order
    factors = [1 - 0.4 + 0.8 * torch.rand(b, generator=g) for _ in range(3)]
    factors.append((2 * torch.rand(b, generator=g) - 1) * 0.1)
    order = torch.rand(4 * b, generator=g).view(b, 4).argsort(dim=1)
    apply = torch.rand(b, generator=g) < 0.8
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(b):
        y = x[i]
        for k in order[i].tolist() if apply[i] else []:
            y = ops[k](y, float(factors[k][i]))
        assert torch.allclose(ours[i], y, atol=5e-5), (i, (ours[i] - y).abs().max())
    assert 0 < int(apply.sum()) < b  # both kinds of image were in the batch


def test_border_sampling_equals_reflection_for_every_box_the_crop_draws() -> None:
    """random_resized_crop samples with padding "border" because inside the image it equals
    "reflection" (the usual choice): checked on drawn boxes down to a few pixels (upsampled),
    flipped or not, and on boxes touching each edge."""
    import torch.nn.functional as F

    from selfsup.data.crops import crop_boxes, crop_grid

    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 3, 23, 31, generator=g)
    boxes = crop_boxes(300, 23, 31, scale=(0.0005, 1.0), ratio=(0.2, 5.0), generator=g)
    boxes[:4] = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [30.0, 22.0, 1.0, 1.0], [0.0, 0.0, 31.0, 23.0], [29.0, 0.0, 2.0, 23.0]]
    )
    flip = torch.rand(300, generator=g) < 0.5
    for size in (8, 40):
        grid = crop_grid(boxes, flip, 23, 31, size)
        border = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        reflect = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        assert torch.allclose(border, reflect, atol=1e-6), (border - reflect).abs().max()
    zeros = F.grid_sample(x, crop_grid(boxes, flip, 23, 31, 40), padding_mode="zeros", align_corners=False)
    assert not torch.allclose(zeros, reflect, atol=1e-3)  # the check can tell paddings apart at the edges


def test_solarize_inverts_the_bright_pixels_of_the_chosen_images() -> None:
    x = torch.tensor([0.1, 0.5, 0.9]).view(1, 1, 1, 3).repeat(2, 1, 1, 1)
    out = random_solarize(x, torch.tensor([1.0, 0.0]))
    assert torch.allclose(out[0].flatten(), torch.tensor([0.1, 0.5, 0.1]))  # 1 - 0.5 = 0.5, 1 - 0.9 = 0.1
    assert torch.equal(out[1], x[1])


def test_byols_asymmetric_views_blur_the_first_and_solarize_the_second() -> None:
    """The same draws with and without each option: only the view it names changes."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)

    def views(**options: object) -> tuple[torch.Tensor, torch.Tensor]:
        return ViewSpec(**options).build()(images, torch.Generator().manual_seed(0))  # type: ignore[arg-type]

    plain, blurred = views(blur_p=(0.0, 0.0)), views(blur_p=(1.0, 0.0))
    assert not torch.equal(plain[0], blurred[0]) and torch.equal(plain[1], blurred[1])
    never, solarized = views(solarize_p=(0.0, 1e-12)), views(solarize_p=(0.0, 1.0))
    assert torch.equal(never[0], solarized[0]) and not torch.equal(never[1], solarized[1])
    with pytest.raises(SelfsupError, match=r"views.solarize_p\[1\] must be in \[0, 1\], got 2"):
        ViewSpec(solarize_p=(0.0, 2.0))
