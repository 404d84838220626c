"""Fine-tuning: the whole network trains, backbone and a linear head, on (a share of) the labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

import lightning as L
import torch

from selfsup import SelfsupError
from selfsup.config import AREA, NON_NEGATIVE, check_ranges, save_plain_hyperparameters
from selfsup.evaluation.features import Features, require_labels, training_view, transfer_backbone
from selfsup.evaluation.linear import Classifier
from selfsup.media import ConfusionFigure
from selfsup.models.backbones import BackboneSpec, vision_transformer
from selfsup.optim.optimizer import OptimizerSpec, param_groups
from selfsup.protocols import TransferHparams
from selfsup.trainer_attrs import datamodule_of

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


class FineTuneHparams(TransferHparams, Protocol):
    """:class:`FineTune`'s hyperparameters, read through :attr:`FineTune.hp`."""

    augment: bool
    crop_min_scale: float
    backbone_lr: float | None
    layer_decay: float | None


class FineTune(L.LightningModule):
    """The whole network trains: backbone (from a checkpoint) and a linear head on its pooled
    features, as torchvision's classifiers; the backbone's own normalization adapts.

    With ``augment``, training images get a random resized crop (scale ``crop_min_scale``..1,
    flipped half the time) on the device; evaluation always uses the plain image.

    Args: as :class:`LinearProbe` (``features.depth`` stays -1), and ``augment`` /
    ``crop_min_scale``; ``backbone_lr``: the backbone's own base rate (None: ``optimizer.lr``,
    the head's), e.g. a tenth of the head's so that few labels do not wash out what pretraining
    learned; ``layer_decay`` (timm ViTs): each block's rate is that of the block above times
    this factor, down to the patch embedding (layer-wise rate decay, Bao et al. 2022, BEiT; MAE
    fine-tunes with 0.75), so the early layers that pretraining shaped move least.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneSpec | None = None,
        features: Features = Features(),
        augment: bool = True,
        crop_min_scale: float = 0.35,
        optimizer: OptimizerSpec = OptimizerSpec(lr=5e-4, weight_decay=1e-5),
        backbone_lr: float | None = None,
        layer_decay: float | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        check_ranges(
            "model.init_args",
            {
                "crop_min_scale": (crop_min_scale, AREA),
                "backbone_lr": (backbone_lr, NON_NEGATIVE),
                "layer_decay": (layer_decay, AREA),
            },
        )
        self.features_spec = Features.of(features)
        if self.features_spec.depth != -1:
            raise SelfsupError(
                f"fine-tuning trains the whole backbone and reads its last layer, not depth "
                f"{self.features_spec.depth}: leave features.depth at -1"
            )
        self.backbone = transfer_backbone(backbone, self.features_spec)
        if layer_decay is not None:
            vision_transformer(self.backbone, "layer_decay")  # a timm ViT, or one line naming the backbone
        # No standardization: SGD at the usual fine-tuning rates stays stable (standardized
        # features made lr 0.1 diverge, see Classifier).
        self.classifier = Classifier(self.backbone.num_features, num_classes, None) if num_classes is not None else None

    @property
    def hp(self) -> FineTuneHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(FineTuneHparams, self.hparams)

    def _trained_classifier(self) -> Classifier:
        # setup's require_labels stops a module built without num_classes before any step.
        assert self.classifier is not None
        return self.classifier

    def check_data(self, dm: L.LightningDataModule) -> None:
        require_labels(self, dm)

    def setup(self, stage: str) -> None:
        require_labels(self, datamodule_of(self.trainer))

    def features(self, batch: dict, split: str) -> torch.Tensor:
        """Features of the batch's images (B, F): randomly cropped in training with ``augment``."""
        crop = self.hp.crop_min_scale if split == "train" and self.hp.augment else None
        return self.backbone(training_view(batch["image"], self.features_spec.input_norm, crop))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._trained_classifier().step(self, self.features(batch, "train"), batch["label"], "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._trained_classifier().step(self, self.features(batch, "val"), batch["label"], "val", batch.get("index"))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._trained_classifier().step(self, self.features(batch, "test"), batch["label"], "test")

    def per_image_correct(self) -> torch.Tensor:
        """Which evaluation images the last validation got right: bool (N,) by row."""
        return self._trained_classifier().val_correct.result()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        spec = OptimizerSpec.of(self.hp.optimizer)
        classifier = self._trained_classifier()
        if self.hp.backbone_lr is None and self.hp.layer_decay is None:
            return spec.build([self.backbone, classifier])
        lr = spec.lr if self.hp.backbone_lr is None else self.hp.backbone_lr
        if self.hp.layer_decay is None:
            backbone = [{**g, "lr": lr} for g in param_groups([self.backbone], spec.weight_decay)]
        else:
            backbone = layer_decay_groups(
                vision_transformer(self.backbone, "layer_decay"), lr, spec, self.hp.layer_decay
            )
        return spec.build([classifier], backbone)

    def configure_callbacks(self) -> list[L.Callback]:
        return [ConfusionFigure()]


def layer_decay_groups(vit: VisionTransformer, lr: float, spec: OptimizerSpec, decay: float) -> list[dict]:
    """Parameter groups of a timm ViT with layer-wise rates: the last block (and the final norm)
    at ``lr``, each block below at ``decay`` times the one above, the embeddings lowest. timm's
    grouping (its ``group_matcher``), with weight decay off for 1-d parameters and the position
    embedding and tokens, as in BEiT and MAE."""
    from timm.optim import param_groups_layer_decay  # timm is there: it built the ViT

    groups = param_groups_layer_decay(
        vit, weight_decay=spec.weight_decay, no_weight_decay_list=vit.no_weight_decay(), layer_decay=decay
    )
    # LARS's flag as param_groups sets it: no adaptation where there is no weight decay.
    return [
        {"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"]}
        | ({"lars_exclude": True} if g["weight_decay"] == 0 else {})
        for g in groups
    ]
