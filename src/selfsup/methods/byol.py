"""BYOL: bootstrap your own latent (Grill et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Protocol, cast

import lightning as L
import torch

from selfsup.config import COUNT, MOMENTUM, check_ranges, save_plain_hyperparameters
from selfsup.data.litdata.samples import CropViews
from selfsup.data.views import ViewSpec, normalize, to_float
from selfsup.evaluation.online import OnlineEvaluation, OnlineHooks, OnlineSpec, validate_on_fixed_views
from selfsup.losses.byol import byol_loss
from selfsup.media import ViewsFigure
from selfsup.metrics import embedding_spread
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP
from selfsup.models.momentum import cosine_momentum, momentum_copy, momentum_update
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import StageHparams


class BYOLHparams(StageHparams, Protocol):
    """:class:`BYOL`'s hyperparameters, read through :attr:`BYOL.hp`."""

    proj_hidden: int
    proj_dim: int
    pred_hidden: int
    target_momentum: float
    views: dict
    online: dict
    num_classes: int | None


class BYOL(L.LightningModule):
    """The online network (backbone, projector, predictor) predicts the target network's
    projection of the other view; the target (backbone, projector) is a momentum copy of the
    online one. No negatives: it learns at the small batches of one GPU or a CPU.

    Loss: the normalised MSE ``2 - 2 cos(p, z')`` between each view's prediction and the other
    view's target projection, averaged over the two directions (:func:`selfsup.losses.byol_loss`).
    The target's momentum rises from ``target_momentum`` to 1 on a cosine over the run's steps
    (a function of the global step, so a resumed run continues it); the target moves once per
    optimizer step, before the step's first batch is encoded, as MoCo's key encoder does.

    Views, the online evaluator and the optimizer are SimCLR's parts, with the same arguments.

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``); None: the small CNN.
        proj_hidden / proj_dim: the projector ``F -> proj_hidden (BN, ReLU) -> proj_dim`` (4096, 256).
        pred_hidden: the predictor ``proj_dim -> pred_hidden (BN, ReLU) -> proj_dim`` (4096).
        target_momentum: the target's momentum at the first step (0.996 on ImageNet, 0.99 on CIFAR).
        views / optimizer / online / num_classes: as in ``SimCLR``.
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        proj_hidden: int = 4096,
        proj_dim: int = 256,
        pred_hidden: int = 4096,
        target_momentum: float = 0.99,
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
                "pred_hidden": (pred_hidden, COUNT),
                "target_momentum": (target_momentum, MOMENTUM),
            },
        )
        self.backbone = BackboneSpec.of(backbone).build()
        self.projector = MLP([self.backbone.num_features, proj_hidden, proj_dim], batch_norm=True)
        self.predictor = MLP([proj_dim, pred_hidden, proj_dim], batch_norm=True)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)
        self.views = ViewSpec.of(views).build()
        self.online = OnlineEvaluation(OnlineSpec.of(online), self.backbone.num_features, num_classes)

    @property
    def hp(self) -> BYOLHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(BYOLHparams, self.hparams)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Online backbone features of plain uint8 images (no augmentation): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    def momentum(self) -> float:
        """The target's momentum at this step: ``target_momentum`` at the first, 1 at the last."""
        total = float(self.trainer.estimated_stepping_batches)
        return cosine_momentum(self.global_step, total, self.hp.target_momentum)

    def update_target(self) -> None:
        """target = m * target + (1 - m) * online, backbone and projector (their BatchNorm too)."""
        momentum_update([self.backbone, self.projector], [self.target_backbone, self.target_projector], self.momentum())

    def loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BYOL's loss of two batches of views (B, 3, S, S); with the online backbone's features
        of ``v0`` (B, F) and the target's projections of ``v0`` (B, proj_dim)."""
        # One pass over both views per network: BatchNorm sees all 2B images together.
        h = self.backbone(torch.cat([v0, v1]))
        p0, p1 = self.predictor(self.projector(h)).chunk(2)
        with torch.no_grad():
            z0, z1 = self.target_projector(self.target_backbone(torch.cat([v0, v1]))).chunk(2)
        return byol_loss(p0, p1, z0, z1), h[: v0.shape[0]], z0

    @property
    def probe_input_norm(self) -> str:
        """Probes read the backbone as it saw its views: ImageNet channel statistics."""
        return "channel"

    def stream_sample(self, image_size: int) -> CropViews:
        """On a streamed dataset the workers cut the two crops from the full images."""
        return CropViews.of_views(self.views, image_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # once per optimizer step
            self.update_target()
        loss, features, z = self.loss(*self.views.of_batch(batch))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/target_momentum", self.momentum(), on_step=True, on_epoch=False)
        # About 1 while images embed apart, 0 once all embed alike (collapse; CollapseWatch warns).
        self.log("train/embedding_spread", embedding_spread(z), on_step=True, on_epoch=True, sync_dist=True)
        return loss + self.online.training_loss(self, features, batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        validate_on_fixed_views(self, batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The target follows by momentum, never by gradient.
        modules = [self.backbone, self.projector, self.predictor]
        return OptimizerSpec.of(self.hp.optimizer).build(modules, self.online.param_groups())

    def configure_callbacks(self) -> list[L.Callback]:
        return [OnlineHooks(), ViewsFigure()]
