"""SimCLR contrastive pretraining (Chen, Kornblith, Norouzi and Hinton, ICML 2020)."""

from __future__ import annotations

import torch

from selfsup.losses.ntxent import NTXentLoss
from selfsup.methods.common import OptimizerName
from selfsup.methods.contrastive import ContrastiveMethod
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP


class SimCLR(ContrastiveMethod):
    """Two augmented views of each image embed close, other images far (NT-Xent).

    Views are made on the training device from the uint8 batch (``SimCLRViews``); both go
    through the backbone and the projection head ``F -> proj_hidden (BN, ReLU) -> proj_dim``;
    the loss runs over the global batch (all ranks' embeddings are negatives).

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``: name, cifar_stem, width, norm);
            None: the small CNN. Stored as a plain dict in the hyperparameters.
        temperature: NT-Xent temperature.
        view_size: side of the views; None uses the input size.
        crop_min_scale: smallest area fraction of the random resized crop.
        num_classes: for the online probe; None reads it from the datamodule.
        online_eval: train a linear probe on detached features alongside (``val/online_top1``)
            and run the kNN monitor (``val/knn_top1``) every ``knn_every`` epochs.
        online_lr: learning rate of the online probe.
        optimizer / lr / ...: see ``selfsup.methods.common.configure_optimizers`` (lr at the reference batch).
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        temperature: float = 0.5,
        view_size: int | None = None,
        crop_min_scale: float = 0.08,
        optimizer: OptimizerName = "adam",
        lr: float = 2e-3,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        num_classes: int | None = None,
        online_eval: bool = True,
        online_lr: float = 1e-3,
        knn_every: int = 5,
        knn_k: int = 200,
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone).as_dict()  # plain data in hparams and the checkpoint
        self.save_hyperparameters()
        self.backbone = BackboneSpec.of(backbone).build()
        self.projector = MLP([self.backbone.num_features, proj_hidden, proj_dim], batch_norm=True)
        self.criterion = NTXentLoss(temperature)
        self.init_online()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, S, S) -> projections (B, proj_dim)."""
        return self.projector(self.backbone(x))

    def contrastive_loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One backbone pass over both views: BatchNorm sees all 2N images together.
        h = self.backbone(torch.cat([v0, v1]))
        z0, z1 = self.projector(h).chunk(2)
        return self.criterion(z0, z1), h[: v0.shape[0]]

    def ssl_modules(self) -> list[torch.nn.Module]:
        return [self.backbone, self.projector]
