"""DINO's loss against lightly's, its multi-crop views and head; MAE's patches, masks and loss."""

from __future__ import annotations

import pytest
import torch

from selfsup.data.views import MultiCropSpec, MultiCropViews
from selfsup.losses import DINOLoss, mae_loss, patchify, random_masking, unpatchify
from selfsup.media import denormalize
from selfsup.methods.dino import clip_each_parameter
from selfsup.models.heads import DINOHead

lightly_loss = pytest.importorskip("lightly.loss")
lightly_utils = pytest.importorskip("lightly.models.utils")


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("views", [2, 8])  # two global crops alone; with six local ones
def test_dino_loss_and_centre_equal_lightlys_over_several_steps(views: int) -> None:
    ours = DINOLoss(32, student_temp=0.1, center_momentum=0.9).double()
    theirs = lightly_loss.DINOLoss(32, warmup_teacher_temp=0.04, teacher_temp=0.04, student_temp=0.1).double()
    for step, temp in enumerate([0.04, 0.055, 0.07]):  # the teacher's temperature as it warms up
        teacher = 3 * random(2, 16, 32, seed=10 * step)
        student = random(views, 16, 32, seed=10 * step + 1)
        s_mine, s_theirs = student.clone().requires_grad_(), student.clone().requires_grad_()
        mine = ours(teacher, s_mine, teacher_temp=temp)
        expected = theirs(list(teacher), list(s_theirs), teacher_temp=temp)
        # lightly holds the temperature as a float32 tensor: agreement to float32's precision.
        torch.testing.assert_close(mine, expected, rtol=1e-7, atol=1e-7)
        (g_mine,) = torch.autograd.grad(mine, s_mine)
        (g_theirs,) = torch.autograd.grad(expected, s_theirs)
        torch.testing.assert_close(g_mine, g_theirs, rtol=1e-7, atol=1e-9)
        # Both moved their centre the same way, from this step's teacher outputs.
        torch.testing.assert_close(ours.center, theirs.center.view_as(ours.center), rtol=1e-12, atol=1e-12)
    # The centre after three steps, by hand: 0.9-momentum running mean of the batch means.
    center = torch.zeros(1, 32, dtype=torch.float64)
    for step in range(3):
        center = 0.9 * center + 0.1 * (3 * random(2, 16, 32, seed=10 * step)).mean(dim=(0, 1))
    torch.testing.assert_close(ours.center, center, rtol=1e-12, atol=1e-12)


def test_dino_loss_leaves_the_centre_alone_in_validation_and_takes_no_teacher_gradient() -> None:
    loss = DINOLoss(8)
    teacher = torch.randn(2, 4, 8, requires_grad=True)
    loss(teacher, torch.randn(4, 4, 8, requires_grad=True), 0.04, update_center=False).backward()
    assert torch.equal(loss.center, torch.zeros(1, 8))
    assert teacher.grad is None


def coordinate_images(b: int, size: int) -> torch.Tensor:
    """uint8 (b, 3, size, size): red is the image's index x 20, green the column, blue the row
    (x 255 / (size - 1)): every pixel tells which image and where it comes from."""
    ramp = torch.linspace(0, 255, size).round()
    img = torch.empty(b, 3, size, size)
    img[:, 0] = 20.0 * torch.arange(b).view(b, 1, 1)
    img[:, 1] = ramp.view(1, 1, size)
    img[:, 2] = ramp.view(1, size, 1)
    return img.to(torch.uint8)


def test_multi_crop_views_have_the_configured_shapes_and_come_from_each_image() -> None:
    spec = MultiCropSpec(local_size=24, num_local=4, global_scale=(0.4, 1.0), local_scale=(0.05, 0.3))
    views = spec.build()
    assert isinstance(views, MultiCropViews)
    # No colour changes, so that the pixels still say where they came from.
    for part in (views.global_views, views.local_views):
        part.jitter_p, part.gray_p, part.blur_p, part.solarize_p = 0.0, 0.0, (0.0, 0.0), (0.0, 0.0)
    images = coordinate_images(6, 96)
    out = views(images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in out] == [(6, 3, 96, 96)] * 2 + [(6, 3, 24, 24)] * 4
    for k, v in enumerate(out):
        pixels = denormalize(v).float()
        # Red: the crop of image i shows image i only (bilinear between equal values).
        assert torch.equal(pixels[:, 0], (20.0 * torch.arange(6)).view(6, 1, 1).expand(6, *v.shape[-2:]))
        # Green and blue: the span of columns and rows the crop covers, as a share of the image.
        width = (pixels[:, 1].amax((1, 2)) - pixels[:, 1].amin((1, 2))) / 255
        height = (pixels[:, 2].amax((1, 2)) - pixels[:, 2].amin((1, 2))) / 255
        lo, hi = spec.global_scale if k < 2 else spec.local_scale
        area = width * height
        # Pixel centres sit half a pixel inside the box: the span is a little under the box.
        assert (area <= hi + 1e-6).all() and (area >= 0.7 * lo).all(), (k, area)
    assert not torch.equal(out[0], out[1])  # the two global crops are drawn apart
    # Without a local size, the local crops are half the global crops' side.
    halves = MultiCropSpec(num_local=1).build()(coordinate_images(2, 64))
    assert [v.shape[-1] for v in halves] == [64, 64, 32]


def test_multi_crop_spec_names_a_bad_setting() -> None:
    from selfsup import SelfsupError

    with pytest.raises(SelfsupError, match=r"crops.local_scale\[0\] must be in \(0, 1\]"):
        MultiCropSpec(local_scale=(0.0, 0.4))


def test_dino_head_shapes_and_fixed_last_layer_norms() -> None:
    head = DINOHead(24, out_dim=100, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 100)
    weight = head.last_layer.weight  # g * v / ||v||, g fixed at 1: unit rows
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(100))
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad
    assert DINOHead(24, 100, 32, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_each_parameter_is_clipped_on_its_own() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    clip_each_parameter([a, b], 3.0)
    torch.testing.assert_close(a.grad.norm(), torch.tensor(3.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # under the bound: unchanged


@pytest.mark.parametrize(("size", "patch"), [(32, 4), (96, 8), (16, 16)])
def test_patchify_and_unpatchify_invert_each_other_in_lightlys_order(size: int, patch: int) -> None:
    images = random(3, 3, size, size, seed=1)
    patches = patchify(images, patch)
    n = (size // patch) ** 2
    assert patches.shape == (3, n, patch * patch * 3)
    assert torch.equal(unpatchify(patches, patch, (size // patch, size // patch)), images)
    assert torch.equal(patches, lightly_utils.patchify(images, patch))  # MAE's (p, p, C) order
    # Patch k, row by row: the pixels of the k-th square.
    k = n - 1 if n > 1 else 0
    r, c = divmod(k, size // patch)
    square = images[0, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
    assert torch.equal(patches[0, k], square.permute(1, 2, 0).flatten())


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_masking_hides_exactly_the_share_per_image_and_is_seeded(ratio: float) -> None:
    keep, mask, restore = random_masking(64, 49, ratio, torch.Generator().manual_seed(3))
    hidden = int(49 * ratio)
    assert (mask.sum(1) == hidden).all()
    assert keep.shape == (64, 49 - hidden)
    assert not mask.gather(1, keep).any()  # the kept patches are the unmasked ones
    assert (keep.sort(1).values.diff(dim=1) > 0).all()  # no patch kept twice
    assert len({tuple(m.tolist()) for m in mask}) > 60  # each image its own mask
    again = random_masking(64, 49, ratio, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip((keep, mask, restore), again, strict=True))
    other = random_masking(64, 49, ratio, torch.Generator().manual_seed(4))[1]
    assert not torch.equal(mask, other)
    # As the decoder uses it: the kept patches (here: their own positions), then mask tokens
    # (-1), put back in order by ``restore``: each kept patch at its place, mask tokens elsewhere.
    decoded = torch.cat([keep, torch.full((64, hidden), -1)], dim=1).gather(1, restore)
    positions = torch.arange(49).expand(64, 49)
    assert torch.equal(decoded[~mask], positions[~mask]) and (decoded[mask] == -1).all()


def test_masking_hides_patches_uniformly() -> None:
    mask = random_masking(4000, 16, 0.75, torch.Generator().manual_seed(0))[1]
    share = mask.float().mean(0)  # each position hidden 75% of the time, within 3 standard errors
    assert ((share - 0.75).abs() < 3 * (0.75 * 0.25 / 4000) ** 0.5).all(), share


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_reads_the_hidden_patches_only(norm_pix: bool) -> None:
    target = random(4, 16, 48, seed=0)
    prediction = random(4, 16, 48, seed=1).requires_grad_()
    _, mask, _ = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0))
    loss = mae_loss(prediction, target, mask, norm_pix)
    # Visible patches wildly wrong, in the prediction and in the target: the loss is the same.
    wrong_prediction = torch.where(mask[..., None], prediction, 1e3 * random(4, 16, 48, seed=2))
    wrong_target = torch.where(mask[..., None], target, -1e3 * random(4, 16, 48, seed=3))
    torch.testing.assert_close(mae_loss(wrong_prediction, wrong_target, mask, norm_pix), loss)
    (grad,) = torch.autograd.grad(loss, prediction)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    # By hand: the mean over hidden patches of the mean squared error of their pixels.
    t = target
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((prediction - t) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected)


def test_coordinate_images_are_what_they_say() -> None:
    img = coordinate_images(2, 5)
    assert img[1, 0, 3, 4] == 20 and img[0, 1, 3, 4] == 255 and img[0, 2, 3, 4] == round(255 * 3 / 4)
