"""Transfer stages: a linear probe on the frozen backbone, and full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from selfsup import SelfsupError
from selfsup.config import PlainData
from selfsup.data.datamodule import ImageDataModule
from selfsup.data.patches import normalize_patches
from selfsup.data.views import normalize, random_resized_crop, to_float
from selfsup.media import ConfusionFigure
from selfsup.methods.common import (
    OptimizerSpec,
    load_backbone,
    param_groups,
    save_plain_hyperparameters,
)
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP

InputNorm = Literal["channel", "per_image"]


def preprocess(images: torch.Tensor, input_norm: InputNorm) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalised as the backbone saw its inputs in pretraining:
    ImageNet channel statistics, or each image standardised (relative location's per-patch norm)."""
    x = to_float(images)
    return normalize_patches(x) if input_norm == "per_image" else normalize(x)


@dataclass(frozen=True)
class Features(PlainData):
    """Which features a transfer stage reads (one typed argument of LinearProbe, FineTune and
    KNNEvaluation; a plain dict in the checkpoint).

    Args:
        checkpoint: a checkpoint of an earlier stage; its ``backbone.*`` weights are loaded
            strictly. None: the random initialisation (the baseline).
        input_norm: ``channel`` (ImageNet statistics) or ``per_image`` standardisation, as the
            backbone saw its inputs in pretraining (relative location: ``per_image``).
        stage: the backbone stage whose pooled output is read (-1: the last; -2: the one before,
            e.g. ResNet layer3), since pretext tasks over-specialise the last stage (mmselfsup:
            relative location probes at 40.4% from res5, 51.2% from res4). Fine-tuning reads the last.
    """

    checkpoint: str | None = None
    input_norm: InputNorm = "channel"
    stage: int = -1


def transfer_backbone(backbone: BackboneSpec | dict | None, features: Features) -> nn.Module:
    """The backbone of a transfer stage, with the ``backbone.*`` weights of ``features.checkpoint``
    loaded strictly (None: the random initialisation, the baseline)."""
    model = BackboneSpec.of(backbone).build()
    if features.checkpoint:
        load_backbone(model, features.checkpoint)
    return model


def require_labels(module: L.LightningModule, dm: object) -> None:
    """Stop before training when the data have no labels to train on, or the module was built
    without a class count (``hparams.num_classes``; one line, the fix)."""
    if isinstance(dm, ImageDataModule) and not dm.has_labels:
        raise SelfsupError(
            f"{type(module).__name__} trains on labels, but the images of {dm.hparams.root} have none "
            f"(data.labels={dm.hparams.labels}); point --data.root at labelled images (ROOT/<class>/<image>), "
            "or set --data.labels folders if its folders are the classes"
        )
    if module.hparams.num_classes is None:
        raise SelfsupError(f"{type(module).__name__} was built without num_classes: selfsup fit links it from "
                           "the data; in Python pass num_classes=dm.num_classes")


class Classifier(nn.Module):
    """A linear head on pooled features (B, F) -> logits (B, C), with its accuracies.

    Logs ``{split}/loss``, ``{split}/top1`` and, above 5 classes, ``{split}/top5`` (with 5
    classes or fewer top-5 is always 100%) for ``train``, ``val`` and ``test``: exact counts over
    the epoch, synced across ranks (torchmetrics).

    Args:
        standardise: ``batch`` or ``layer`` standardisation of the features before the linear
            layer (a frozen backbone), or None (fine-tuning).
    """

    def __init__(self, num_features: int, num_classes: int, standardise: Literal["batch", "layer"] | None) -> None:
        super().__init__()
        if num_classes < 2:
            raise SelfsupError(f"a classifier needs at least 2 classes, got {num_classes}")
        linear = MLP([num_features, num_classes], init_scale=0.01)
        if standardise is None:
            self.head: nn.Module = linear
        else:
            # Standardised features (BN without affine) make one learning rate fit every frozen
            # backbone; their statistics are fixed, so a cumulative average (momentum=None)
            # gets them exactly. Where the backbone asks for no batch statistics (GroupNorm:
            # batch size 1 must work) each feature vector is standardised on its own.
            # Standardised features have squared norm F, which multiplies the head's step by F
            # under SGD: the probe configs use Adam, which does not care.
            norm = (nn.LayerNorm(num_features, elementwise_affine=False) if standardise == "layer"
                    else nn.BatchNorm1d(num_features, affine=False, momentum=None))
            self.head = nn.Sequential(norm, linear)
        self.top_k: int | None = 5 if num_classes > 5 else None
        ks = [("top1", 1)] + ([(f"top{self.top_k}", self.top_k)] if self.top_k else [])
        self.metrics = nn.ModuleDict({
            f"{split}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for split in ("train", "val", "test") for name, k in ks
        })
        # Of validation, drawn by selfsup.media.ConfusionFigure.
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def step(self, module: L.LightningModule, features: torch.Tensor, labels: torch.Tensor, split: str) -> torch.Tensor:
        """Cross-entropy of the head on ``features`` (B, F); logs loss and accuracies of ``split``."""
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels)
        train = split == "train"
        module.log(f"{split}/loss", loss, prog_bar=train, on_step=train, on_epoch=True, batch_size=labels.shape[0],
                   sync_dist=not train)
        for name in ("top1", f"top{self.top_k}") if self.top_k else ("top1",):
            metric = self.metrics[f"{split}_{name}"]
            metric(logits, labels)
            module.log(f"{split}/{name}", metric, prog_bar=name == "top1", on_step=train, on_epoch=True)
        if split == "val":
            self.confusion.update(logits.detach(), labels)
        return loss


class LinearProbe(L.LightningModule):
    """A linear classifier on the frozen backbone's pooled features.

    The backbone stays in eval mode (BatchNorm statistics frozen). With ``cache_features``
    each image's features are computed once and reused in later epochs, so a probe costs
    one backbone pass over the data plus cheap linear epochs.

    Args:
        num_classes: classes of the labels; ``selfsup fit`` links it from the DataModule.
        backbone: which network (``selfsup.models.BackboneSpec``); None: the small CNN.
        features: :class:`Features`: the checkpoint (None: the random-init baseline), the input
            normalisation and the backbone stage probed.
        cache_features: compute each image's features once.
        optimizer: ``selfsup.methods.common.OptimizerSpec`` (lr at the reference batch).
    The typed arguments are stored as plain dicts in the hyperparameters.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneSpec | None = None,
        features: Features = Features(),
        cache_features: bool = True,
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-3),
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        self.features_spec = Features.of(features)
        self.backbone = transfer_backbone(backbone, self.features_spec).requires_grad_(False)
        # A GroupNorm backbone asks for no batch statistics anywhere: neither does its probe.
        standardise = "layer" if BackboneSpec.of(backbone).norm == "group" else "batch"
        self.classifier = (Classifier(self.backbone.stage_features(self.features_spec.stage), num_classes, standardise)
                           if num_classes is not None else None)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_data(self, dm: L.LightningDataModule) -> None:
        require_labels(self, dm)

    def setup(self, stage: str) -> None:
        require_labels(self, getattr(self.trainer, "datamodule", None))

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen BatchNorm statistics too
        return self

    @torch.no_grad()
    def _compute(self, images: torch.Tensor) -> torch.Tensor:
        # Lightning restores each submodule's recorded train/eval flag around validation,
        # bypassing train(); re-assert eval here so BatchNorm statistics never move.
        if self.backbone.training:
            self.backbone.eval()
        f = self.features_spec
        return self.backbone(preprocess(images, f.input_norm), stage=f.stage)

    @torch.no_grad()
    def features(self, batch: dict, split: str) -> torch.Tensor:
        """Frozen features of the batch's images (B, F), from the cache when computed before."""
        images = batch["image"]
        # The cache is indexed by the image's row in its split, which ImageDataModule provides.
        dm = self.trainer.datamodule if self._trainer is not None else None
        if not self.hparams.cache_features or not isinstance(dm, ImageDataModule):
            return self._compute(images)
        idx = batch["index"]
        if split not in self._cache:
            n = len(dm.train_set if split == "train" else dm.eval_set)
            f = self.backbone.stage_features(self.features_spec.stage)
            self._cache[split] = (torch.zeros(n, f, device=images.device), torch.zeros(n, dtype=torch.bool, device=images.device))
        store, filled = self._cache[split]
        todo = ~filled[idx]
        if todo.any():
            store[idx[todo]] = self._compute(images[todo]).to(store.dtype)  # bf16 under autocast
            filled[idx[todo]] = True
        return store[idx]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.classifier.step(self, self.features(batch, "train"), batch["label"], "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.classifier.step(self, self.features(batch, "val"), batch["label"], "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.classifier.step(self, self.features(batch, "test"), batch["label"], "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerSpec.of(self.hparams.optimizer).build([self.classifier])

    def configure_callbacks(self) -> list[L.Callback]:
        return [ConfusionFigure()]


class FineTune(L.LightningModule):
    """The whole network trains: backbone (from a checkpoint) and a linear head on its pooled
    features, as torchvision's classifiers; the backbone's own normalisation adapts.

    With ``augment``, training images get a random resized crop (scale ``crop_min_scale``..1,
    flipped half the time) on the device; evaluation always uses the plain image.

    Args: as :class:`LinearProbe` (``features.stage`` stays -1), and ``augment`` / ``crop_min_scale``; ``backbone_lr``: the
    backbone's own base rate (None: ``optimizer.lr``, the head's), e.g. a tenth of the head's so
    that few labels do not wash out what pretraining learnt.
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
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        self.features_spec = Features.of(features)
        if self.features_spec.stage != -1:
            raise SelfsupError(f"fine-tuning trains the whole backbone and reads its last stage, not stage "
                               f"{self.features_spec.stage}: leave features.stage at -1")
        self.backbone = transfer_backbone(backbone, self.features_spec)
        # No standardisation: SGD at the usual fine-tuning rates stays stable (standardised
        # features made lr 0.1 diverge, see Classifier).
        self.classifier = Classifier(self.backbone.num_features, num_classes, None) if num_classes is not None else None

    def check_data(self, dm: L.LightningDataModule) -> None:
        require_labels(self, dm)

    def setup(self, stage: str) -> None:
        require_labels(self, getattr(self.trainer, "datamodule", None))

    def features(self, batch: dict, split: str) -> torch.Tensor:
        """Features of the batch's images (B, F): randomly cropped in training with ``augment``."""
        x = preprocess(batch["image"], self.features_spec.input_norm)
        if split == "train" and self.hparams.augment:
            x = random_resized_crop(x, x.shape[-1], scale=(self.hparams.crop_min_scale, 1.0))
        return self.backbone(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.classifier.step(self, self.features(batch, "train"), batch["label"], "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.classifier.step(self, self.features(batch, "val"), batch["label"], "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.classifier.step(self, self.features(batch, "test"), batch["label"], "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        spec = OptimizerSpec.of(self.hparams.optimizer)
        if self.hparams.backbone_lr is None:
            return spec.build([self.backbone, self.classifier])
        backbone = [{**g, "lr": self.hparams.backbone_lr} for g in param_groups([self.backbone], spec.weight_decay)]
        return spec.build([self.classifier], backbone)

    def configure_callbacks(self) -> list[L.Callback]:
        return [ConfusionFigure()]
