"""SimCLR contrastive pretraining (Chen, Kornblith, Norouzi and Hinton, ICML 2020)."""

from __future__ import annotations

import lightning as L
import torch

from selfsup.data.views import SimCLRViews
from selfsup.losses.ntxent import NTXentLoss
from selfsup.methods.common import OptimizerName, configure_optimizers
from selfsup.models.backbones import Norm, build_backbone
from selfsup.models.heads import MLP


class SimCLR(L.LightningModule):
    """Two augmented views of each image embed close, other images far (NT-Xent).

    Views are made on the training device from the uint8 batch (``SimCLRViews``); both go
    through the backbone and the projection head ``F -> proj_hidden (BN, ReLU) -> proj_dim``;
    the loss runs over the global batch (all ranks' embeddings are negatives).

    Args:
        temperature: NT-Xent temperature.
        view_size: side of the views; None uses the input size.
        crop_min_scale: smallest area fraction of the random resized crop.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        cifar_stem: bool = False,
        width: int = 32,
        norm: Norm = "batch",
        proj_hidden: int = 512,
        proj_dim: int = 128,
        temperature: float = 0.5,
        view_size: int | None = None,
        crop_min_scale: float = 0.08,
        optimizer: OptimizerName = "adam",
        lr: float = 2e-3,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        cosine: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, cifar_stem, width, norm)
        self.projector = MLP([self.backbone.num_features, proj_hidden, proj_dim], batch_norm=True)
        self.criterion = NTXentLoss(temperature)
        self._views: SimCLRViews | None = None

    def views(self, images: torch.Tensor) -> SimCLRViews:
        size = self.hparams.view_size or images.shape[-1]
        if self._views is None or self._views.image_size != size:
            self._views = SimCLRViews(size, scale=(self.hparams.crop_min_scale, 1.0))
        return self._views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, S, S) -> projections (B, proj_dim)."""
        return self.projector(self.backbone(x))

    def shared_step(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        v0, v1 = self.views(images)(images, generator)
        # One backbone pass over both views: BatchNorm sees all 2N images together.
        z = self(torch.cat([v0, v1]))
        z0, z1 = z.chunk(2)
        return self.criterion(z0, z1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.shared_step(batch["image"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        g = torch.Generator(device=batch["image"].device).manual_seed(1000 + batch_idx)
        loss = self.shared_step(batch["image"], g)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)

    def configure_optimizers(self) -> dict:
        return configure_optimizers(self, [self.backbone, self.projector])
