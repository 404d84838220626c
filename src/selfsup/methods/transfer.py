"""Transfer stages: a linear probe on the frozen backbone, and full fine-tuning."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from selfsup import SelfsupError
from selfsup.data.datamodule import ImageDataModule
from selfsup.data.patches import normalize_patches
from selfsup.data.views import normalize, random_resized_crop, to_float
from selfsup.methods.common import OptimizerName, configure_optimizers, load_backbone
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP

InputNorm = Literal["channel", "per_image"]


def preprocess(images: torch.Tensor, input_norm: InputNorm) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalised as the backbone saw its inputs in pretraining:
    ImageNet channel statistics, or each image standardised (relative location's per-patch norm)."""
    x = to_float(images)
    return normalize_patches(x) if input_norm == "per_image" else normalize(x)


class _Classifier(L.LightningModule):
    """Shared plumbing of the transfer stages: backbone hand-off, head, top-1/top-5, logging."""

    frozen = False  # whether the backbone trains
    feature_stage = -1  # which backbone stage feeds the head

    def __init__(self, num_classes: int | None, backbone: BackboneSpec | None, backbone_checkpoint: str | None) -> None:
        super().__init__()
        spec = BackboneSpec.of(backbone)
        self.norm = spec.norm
        self.backbone = spec.build()
        if backbone_checkpoint:
            load_backbone(self.backbone, backbone_checkpoint)
        self.head: nn.Module | None = None
        if num_classes is not None:
            self._build_head(num_classes)

    def _build_head(self, num_classes: int) -> None:
        if num_classes < 2:
            raise SelfsupError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.hparams["num_classes"] = num_classes  # stored with the checkpoint
        f = self.backbone.stage_features(self.feature_stage)
        if self.frozen:
            # Standardised features (BN without affine) make one learning rate fit every frozen
            # backbone; their statistics are fixed, so a cumulative average (momentum=None)
            # gets them exactly. A GroupNorm backbone asks for no batch statistics anywhere
            # (batch size 1 must work): each feature vector is then standardised on its own.
            # Standardised features have squared norm F, which multiplies the head's step by F
            # under SGD: the probe configs use Adam, which does not care.
            if self.norm == "group":
                standardise: nn.Module = nn.LayerNorm(f, elementwise_affine=False)
            else:
                standardise = nn.BatchNorm1d(f, affine=False, momentum=None)
            self.head = nn.Sequential(standardise, MLP([f, num_classes], init_scale=0.01))
        else:
            # Fine-tuning: a plain linear layer on the pooled features, as torchvision's
            # classifiers; the backbone's own normalisation adapts, and SGD at the usual rates
            # stays stable (standardised features made lr 0.1 diverge, see above).
            self.head = MLP([f, num_classes], init_scale=0.01)
        # Top-5 only where it says something: with 5 classes or fewer it is always 100%.
        self.top_k: int | None = 5 if num_classes > 5 else None
        ks = [("top1", 1)] + ([(f"top{self.top_k}", self.top_k)] if self.top_k else [])
        self.metrics = nn.ModuleDict({
            f"{split}_{name}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
            for split in ("val", "test") for name, top_k in ks
        })
        self.metrics["train_top1"] = MulticlassAccuracy(num_classes, average="micro")

    def check_data(self, dm: L.LightningDataModule) -> None:
        """Stop before training when the data have no labels to train on (one line, the fix)."""
        if isinstance(dm, ImageDataModule) and not dm.has_labels:
            raise SelfsupError(
                f"{type(self).__name__} trains on labels, but the images of {dm.hparams.root} have none "
                f"(data.labels={dm.hparams.labels}); point --data.root at labelled images (ROOT/<class>/<image>), "
                "or set --data.labels folders if its folders are the classes"
            )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            self.check_data(dm)
        if self.head is None:
            if dm is None or not hasattr(dm, "num_classes"):
                raise SelfsupError("num_classes is not set and the datamodule does not provide it")
            self._build_head(dm.num_classes)

    def features(self, images: torch.Tensor, batch: dict, split: str) -> torch.Tensor:
        raise NotImplementedError

    def _eval_step(self, batch: dict, split: str) -> None:
        logits = self.head(self.features(batch["image"], batch, split))
        y = batch["label"]
        self.log(f"{split}/loss", F.cross_entropy(logits, y), batch_size=y.shape[0], sync_dist=True)
        for name in ("top1", f"top{self.top_k}") if self.top_k else ("top1",):
            metric = self.metrics[f"{split}_{name}"]
            metric(logits, y)
            self.log(f"{split}/{name}", metric, prog_bar=name == "top1")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.head(self.features(batch["image"], batch, "train"))
        y = batch["label"]
        loss = F.cross_entropy(logits, y)
        self.metrics["train_top1"](logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/top1", self.metrics["train_top1"], prog_bar=True, on_step=True, on_epoch=True)
        return loss


class LinearProbe(_Classifier):
    """A linear classifier on the frozen backbone's pooled features.

    The backbone stays in eval mode (BatchNorm statistics frozen). With ``cache_features``
    each image's features are computed once and reused in later epochs, so a probe costs
    one backbone pass over the data plus cheap linear epochs.

    Args:
        num_classes: None reads it from the datamodule.
        backbone: which network (``selfsup.models.BackboneSpec``: name, cifar_stem, width, norm);
            None: the small CNN. Stored as a plain dict in the hyperparameters.
        backbone_checkpoint: a checkpoint of an earlier stage; its ``backbone.*`` weights are
            loaded strictly. None probes the random initialisation (the baseline).
        input_norm: ``channel`` (ImageNet statistics) or ``per_image`` standardisation.
        feature_stage: probe the pooled output of this backbone stage (-1: the last; -2: the
            one before, e.g. ResNet layer3), since pretext tasks over-specialise the last stage
            (mmselfsup: relative location probes at 40.4% from res5, 51.2% from res4).
        optimizer / lr / ...: see ``selfsup.methods.common.configure_optimizers`` (lr at the reference batch).
    """

    frozen = True

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneSpec | None = None,
        backbone_checkpoint: str | None = None,
        input_norm: InputNorm = "channel",
        feature_stage: int = -1,
        cache_features: bool = True,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
    ) -> None:
        self.feature_stage = feature_stage
        backbone = BackboneSpec.of(backbone).as_dict()  # plain data in hparams and the checkpoint
        super().__init__(num_classes, backbone, backbone_checkpoint)
        self.save_hyperparameters()
        self.backbone.requires_grad_(False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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
        return self.backbone(preprocess(images, self.hparams.input_norm), stage=self.feature_stage)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: dict, split: str) -> torch.Tensor:
        # The cache is indexed by the image's row in its split, which ImageDataModule provides.
        dm = self.trainer.datamodule if self._trainer is not None else None
        if not self.hparams.cache_features or not isinstance(dm, ImageDataModule):
            return self._compute(images)
        idx = batch["index"]
        if split not in self._cache:
            n = len(dm.train_set if split == "train" else dm.eval_set)
            f = self.backbone.stage_features(self.feature_stage)
            self._cache[split] = (torch.zeros(n, f, device=images.device), torch.zeros(n, dtype=torch.bool, device=images.device))
        store, filled = self._cache[split]
        todo = ~filled[idx]
        if todo.any():
            store[idx[todo]] = self._compute(images[todo]).to(store.dtype)  # bf16 under autocast
            filled[idx[todo]] = True
        return store[idx]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return configure_optimizers(self, [self.head])


class FineTune(_Classifier):
    """The whole network trains: backbone (from a checkpoint) and a linear head.

    With ``augment``, training images get a random resized crop (scale ``crop_min_scale``..1,
    flipped half the time) on the device; evaluation always uses the plain image.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneSpec | None = None,
        backbone_checkpoint: str | None = None,
        input_norm: InputNorm = "channel",
        augment: bool = True,
        crop_min_scale: float = 0.35,
        optimizer: OptimizerName = "adam",
        lr: float = 5e-4,
        weight_decay: float = 1e-5,
        momentum: float = 0.9,
    ) -> None:
        backbone = BackboneSpec.of(backbone).as_dict()  # plain data in hparams and the checkpoint
        super().__init__(num_classes, backbone, backbone_checkpoint)
        self.save_hyperparameters()

    def features(self, images: torch.Tensor, batch: dict, split: str) -> torch.Tensor:
        x = preprocess(images, self.hparams.input_norm)
        if split == "train" and self.hparams.augment:
            x = random_resized_crop(x, x.shape[-1], scale=(self.hparams.crop_min_scale, 1.0))
        return self.backbone(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return configure_optimizers(self, [self.backbone, self.head])
