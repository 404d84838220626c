"""The views against torchvision at scale: the jitter's distributions over thousands of draws, and
the compiled color steps against the eager ones (a compilation of seconds)."""

from __future__ import annotations

import io
import math
import shutil
import zipfile

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from selfsup.data.sources import SAMPLE_ZIP
from selfsup.data.views import FELL_BACK, SimCLRViews, color_jitter

from reference import ks_distance, ks_limit, rgb_to_hsv


def image_stats(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image: mean brightness (V), mean saturation, and the circular mean hue."""
    hsv = rgb_to_hsv(x)
    angle = hsv[:, 0] * 2 * math.pi
    weight = hsv[:, 1]  # hue of a near-gray pixel says little
    hue = torch.atan2((weight * angle.sin()).mean((1, 2)), (weight * angle.cos()).mean((1, 2)))
    return {
        "brightness": hsv[:, 2].mean((1, 2)).numpy(),
        "saturation": hsv[:, 1].mean((1, 2)).numpy(),
        "hue": hue.numpy(),
    }


def test_color_jitter_shifts_images_as_torchvision_does() -> None:
    """One real colorful image jittered 3,000 times: the per-image brightness, saturation and
    hue shifts have the distributions of torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1)
    (random order of the four operations included)."""

    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        name = sorted(n for n in zf.namelist() if n.startswith("train/frog/"))[3]
        img = torch.from_numpy(np.array(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))).permute(2, 0, 1)
    x = img.float() / 255
    n = 3000
    ours = color_jitter(x.expand(n, -1, -1, -1).contiguous(), p=1.0, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    theirs = torch.stack([jitter(x) for _ in range(n)])
    a, b = image_stats(ours), image_stats(theirs)
    for key in a:
        assert ks_distance(a[key], b[key]) < ks_limit(n, n), key
    assert a["brightness"].std() > 0.02 and a["hue"].std() > 0.05  # the test image does move


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="Inductor needs a C++ compiler")
def test_compiled_views_equal_the_eager_ones() -> None:
    """``compile=True`` (the color steps through torch.compile, any batch size) gives the eager
    views from the same draws, for two batch sizes, compiled (no fallback to eager)."""

    eager, fast = SimCLRViews(16), SimCLRViews(16, compile=True)
    for b in (12, 7):
        imgs = torch.randint(0, 256, (b, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(b))
        want = eager(imgs, torch.Generator().manual_seed(3))
        got = fast(imgs, torch.Generator().manual_seed(3))
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape == (b, 3, 16, 16) and torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
    assert not FELL_BACK  # every function ran compiled
