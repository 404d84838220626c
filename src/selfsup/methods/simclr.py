"""SimCLR contrastive pretraining (Chen, Kornblith, Norouzi and Hinton, ICML 2020)."""

from __future__ import annotations

from typing import cast

import lightning as L
import torch

from selfsup.config import COUNT, POSITIVE, check_ranges, save_plain_hyperparameters
from selfsup.data.litdata.samples import CropViews
from selfsup.data.views import ViewSpec, normalize, to_float
from selfsup.evaluation.online import OnlineEvaluation, OnlineHooks, OnlineSpec, validate_on_fixed_views
from selfsup.losses.ntxent import NTXentLoss
from selfsup.media import ViewsFigure
from selfsup.metrics import embedding_spread
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import TwoViewHparams

#: :class:`SimCLR`'s hyperparameters, read through :attr:`SimCLR.hp`.
SimCLRHparams = TwoViewHparams


class SimCLR(L.LightningModule):
    """Two augmented views of each image embed close, other images far (NT-Xent).

    Views are made on the training device from the uint8 batch (``SimCLRViews``); both go
    through the backbone in one pass and the projection head ``F -> proj_hidden (BN, ReLU) ->
    proj_dim``; the loss runs over the global batch (all ranks' embeddings are negatives).

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``); None: the small CNN.
        proj_hidden / proj_dim: widths of the projection head.
        temperature: NT-Xent temperature.
        views: ``selfsup.data.views.ViewSpec``: view size and smallest crop of SimCLR's views.
        optimizer: ``selfsup.optim.OptimizerSpec`` (lr at the reference batch).
        online: ``selfsup.evaluation.OnlineSpec``: the linear head and kNN monitor.
        num_classes: classes of the training labels, for the online head; ``selfsup fit`` links
            it from the DataModule; None: no head.
    The typed arguments are stored as plain dicts in the hyperparameters.
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        temperature: float = 0.5,
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
                "proj_hidden": (proj_hidden, COUNT),
                "proj_dim": (proj_dim, COUNT),
                "temperature": (temperature, POSITIVE),
            },
        )
        self.backbone = BackboneSpec.of(backbone).build()
        self.projector = MLP([self.backbone.num_features, proj_hidden, proj_dim], batch_norm=True)
        self.criterion = NTXentLoss(temperature)
        self.views = ViewSpec.of(views).build()
        self.online = OnlineEvaluation(OnlineSpec.of(online), self.backbone.num_features, num_classes)

    @property
    def hp(self) -> SimCLRHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(SimCLRHparams, self.hparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, 3, S, S) -> projections (B, proj_dim)."""
        return self.projector(self.backbone(x))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of plain uint8 images (no augmentation): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    def loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NT-Xent of two batches of views (B, 3, S, S); with the backbone features (B, F) and
        the projections (B, proj_dim) of ``v0``."""
        # One backbone pass over both views: BatchNorm sees all 2B images together.
        h = self.backbone(torch.cat([v0, v1]))
        z0, z1 = self.projector(h).chunk(2)
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
        return OptimizerSpec.of(self.hp.optimizer).build([self.backbone, self.projector], self.online.param_groups())

    def configure_callbacks(self) -> list[L.Callback]:
        return [OnlineHooks(), ViewsFigure()]
