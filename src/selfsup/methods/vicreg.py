"""VICReg: variance-invariance-covariance regularization (Bardes, Ponce and LeCun, ICLR 2022)."""

from __future__ import annotations

from typing import Protocol, cast

import lightning as L
import torch

from selfsup.config import COUNT, NON_NEGATIVE, check_ranges, save_plain_hyperparameters
from selfsup.data.litdata.samples import CropViews
from selfsup.data.views import ViewSpec, normalize, to_float
from selfsup.evaluation.online import OnlineEvaluation, OnlineHooks, OnlineSpec, validate_on_fixed_views
from selfsup.losses.vicreg import VICRegLoss
from selfsup.media import ViewsFigure
from selfsup.metrics import embedding_spread
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import StageHparams


class VICRegHparams(StageHparams, Protocol):
    """:class:`VICReg`'s hyperparameters, read through :attr:`VICReg.hp`."""

    expander_dim: int | None
    invariance_weight: float
    variance_weight: float
    covariance_weight: float
    views: dict
    online: dict
    num_classes: int | None


class VICReg(L.LightningModule):
    """The two views' embeddings are pulled together (invariance) while each embedding dimension
    keeps a standard deviation of at least 1 over the batch (variance) and the dimensions stay
    decorrelated (covariance): no negatives, no momentum network, no collapse.

    The expander is the paper's: three linear layers of width ``expander_dim`` with BatchNorm
    and ReLU between them (8192 for ResNet-50's 2048 features; by default 4 times the backbone's
    features, 2048 for ResNet-18). The loss runs over the global batch under DDP
    (:class:`selfsup.losses.VICRegLoss`).

    Views, the online evaluator and the optimizer are SimCLR's parts, with the same arguments.

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``); None: the small CNN.
        expander_dim: width of the expander's three layers; None: 4 x the backbone's features.
        invariance_weight / variance_weight / covariance_weight: the paper's 25, 25 and 1.
        views / optimizer / online / num_classes: as in ``SimCLR``.
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        expander_dim: int | None = None,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        views: ViewSpec = ViewSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(lr=2e-3, weight_decay=1e-6),
        online: OnlineSpec = OnlineSpec(),
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        check_ranges(
            "model.init_args",
            {
                "expander_dim": (expander_dim, COUNT),
                "invariance_weight": (invariance_weight, NON_NEGATIVE),
                "variance_weight": (variance_weight, NON_NEGATIVE),
                "covariance_weight": (covariance_weight, NON_NEGATIVE),
            },
        )
        self.backbone = BackboneSpec.of(backbone).build()
        width = expander_dim or 4 * self.backbone.num_features
        self.expander = MLP([self.backbone.num_features, width, width, width], batch_norm=True)
        self.criterion = VICRegLoss(invariance_weight, variance_weight, covariance_weight)
        self.views = ViewSpec.of(views).build()
        self.online = OnlineEvaluation(OnlineSpec.of(online), self.backbone.num_features, num_classes)

    @property
    def hp(self) -> VICRegHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(VICRegHparams, self.hparams)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of plain uint8 images (no augmentation): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    def loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VICReg's loss of two batches of views (B, 3, S, S); with the backbone features (B, F)
        and the expander's embeddings (B, expander_dim) of ``v0``."""
        # One backbone pass over both views: BatchNorm sees all 2B images together.
        h = self.backbone(torch.cat([v0, v1]))
        z0, z1 = self.expander(h).chunk(2)
        return self.criterion(z0, z1), h[: v0.shape[0]], z0

    @property
    def probe_input_norm(self) -> str:
        """Probes read the backbone as it saw its views: ImageNet channel statistics."""
        return "channel"

    def stream_sample(self, image_size: int) -> CropViews:
        """On a streamed dataset the workers cut the two crops from the full images."""
        return CropViews.of_views(self.views, image_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, features, z = self.loss(*self.views.of_batch(batch))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        # About 1 while images embed apart, 0 once all embed alike (collapse; CollapseWatch warns).
        self.log("train/embedding_spread", embedding_spread(z), on_step=True, on_epoch=True, sync_dist=True)
        return loss + self.online.training_loss(self, features, batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        validate_on_fixed_views(self, batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerSpec.of(self.hp.optimizer).build([self.backbone, self.expander], self.online.param_groups())

    def configure_callbacks(self) -> list[L.Callback]:
        return [OnlineHooks(), ViewsFigure()]
