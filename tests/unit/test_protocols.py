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
    StreamsSamples,
)

SMALL = {"name": "small_cnn", "width": 8}
#: What the workers of a streamed dataset make for each method.
STREAMED = {"relative_location": RandomSquare, "distill": CropViews}
STREAMED |= {name: CropViews for name in ("simclr", "moco", "byol", "vicreg")}


@pytest.mark.parametrize("name", sorted(PRETRAINING))
def test_every_pretraining_method_offers_the_pretraining_contract(name: str) -> None:
    module = PRETRAINING[name](backbone=SMALL)
    assert isinstance(module, PretrainingMethod)
    assert module.probe_input_norm in ("channel", "per_image")
    sample = module.stream_sample(32)
    assert isinstance(sample, STREAMED[name])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    module.eval()
    with torch.no_grad():
        features = module.embed(images)
    assert features.shape == (4, module.backbone.num_features)
    two_view = name != "relative_location"
    assert isinstance(module, HasViews) == two_view and isinstance(module, HasOnline) == two_view
    if two_view:
        v0, v1 = module.views(images, torch.Generator().manual_seed(0))
        assert v0.shape == v1.shape == (4, 3, 32, 32)


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
