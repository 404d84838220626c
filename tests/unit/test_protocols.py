"""Every registered stage offers the contracts of selfsup.protocols that the DataModule, the run
layer, the pipeline and the evaluators rely on."""

from __future__ import annotations

import pytest
import torch

from selfsup.data.litdata.samples import CenterImage, CropViews, LabelOnly, RandomSquare
from selfsup.evaluation import EVALUATIONS
from selfsup.methods import PRETRAINING, RelativeLocation
from selfsup.protocols import (
    ChecksData,
    Embeds,
    HasClassifier,
    HasOnline,
    HasViews,
    PretrainingMethod,
    ProbeInputNorm,
    Reconstructs,
    StreamsSamples,
)

SMALL = {"name": "small_cnn", "width": 8}
#: MAE works on a vision transformer's tokens: one of 1 block.
SMALL_VIT = {"name": "timm:vit_tiny_patch16_224", "image_size": 32, "patch_size": 8, "timm_kwargs": {"depth": 1}}
#: What the workers of a streamed dataset make for each method.
STREAMED = {"relative_location": RandomSquare, "distill": CropViews, "dino": CenterImage, "mae": CropViews}
STREAMED |= {name: CropViews for name in ("simclr", "moco", "byol", "vicreg")}


@pytest.mark.parametrize("name", sorted(PRETRAINING))
def test_every_pretraining_method_offers_the_pretraining_contract(name: str) -> None:
    module = PRETRAINING[name](backbone=SMALL_VIT if name == "mae" else SMALL)
    assert isinstance(module, PretrainingMethod)
    assert module.probe_input_norm in ("channel", "per_image")
    sample = module.stream_sample(32)
    assert isinstance(sample, STREAMED[name])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    module.eval()
    with torch.no_grad():
        features = module.embed(images)
    assert features.shape == (4, module.backbone.num_features)
    assert isinstance(module, HasOnline) == (name != "relative_location")
    assert isinstance(module, Reconstructs) == (name == "mae")
    two_view = name not in ("relative_location", "mae")
    assert isinstance(module, HasViews) == two_view
    if two_view:  # two views, or DINO's two global crops and its local ones
        views = module.views(images, torch.Generator().manual_seed(0))
        assert views[0].shape == views[1].shape == (4, 3, 32, 32)
        assert len(views) == (2 + module.views.num_local if name == "dino" else 2)


def test_relative_location_probes_read_patches_as_they_were_normalized() -> None:
    assert RelativeLocation(backbone=SMALL).probe_input_norm == "per_image"
    assert RelativeLocation(backbone=SMALL, per_patch_norm=False).probe_input_norm == "channel"
    assert isinstance(RelativeLocation(backbone=SMALL), ChecksData)


@pytest.mark.parametrize("name", sorted(EVALUATIONS))
def test_every_evaluation_checks_its_data_and_embeds(name: str) -> None:
    module = EVALUATIONS[name](num_classes=3, backbone=SMALL)
    assert isinstance(module, ChecksData) and not isinstance(module, PretrainingMethod)
    assert isinstance(module, HasClassifier) == (name != "knn")
    if name == "linear":  # the probe streams the center square until its features are cached
        assert isinstance(module, StreamsSamples) and isinstance(module.stream_sample(32), CenterImage)
        module._cache["train"] = (torch.zeros(2, 32), torch.ones(2, dtype=torch.bool))
        assert isinstance(module.stream_sample(32), LabelOnly)
    if name == "knn":
        assert isinstance(module, Embeds) and not isinstance(module, ProbeInputNorm)
