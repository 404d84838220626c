"""MoCo v2: momentum contrast with a queue of negatives (He et al. 2020; Chen et al. 2020, v2)."""

from __future__ import annotations

from typing import Protocol, cast

import lightning as L
import torch
import torch.nn.functional as F

from selfsup.config import COUNT, MOMENTUM, POSITIVE, check_ranges, save_plain_hyperparameters
from selfsup.data.litdata.samples import CropViews
from selfsup.data.views import ViewSpec, normalize, to_float
from selfsup.distributed import gather_no_grad
from selfsup.evaluation.online import OnlineEvaluation, OnlineHooks, OnlineSpec, validate_on_fixed_views
from selfsup.losses.infonce import info_nce
from selfsup.media import ViewsFigure
from selfsup.metrics import embedding_spread
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP
from selfsup.models.momentum import momentum_copy, momentum_update
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import TwoViewHparams


class MoCoHparams(TwoViewHparams, Protocol):
    """:class:`MoCo`'s hyperparameters, read through :attr:`MoCo.hp`."""

    queue_size: int
    key_momentum: float
    symmetric: bool


class MoCo(L.LightningModule):
    """Queries from the trained encoder, keys from its momentum (EMA) copy; negatives from a
    queue of past keys, so small per-device batches (one GPU, a CPU) still see many negatives.

    Loss for each query q with its key k+ and queue entries k_j (all L2-normalized):
    ``-log( exp(q.k+ / t) / (exp(q.k+ / t) + sum_j exp(q.k_j / t)) )``. Keys are gathered
    from every rank without gradient before they enter the queue, so the queue is identical
    on all ranks. The key encoder's BatchNorm sees only the local batch (no shuffle-BN).

    Views, the online evaluator and the optimizer are SimCLR's parts, with the same arguments.

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``); None: the small CNN.
        queue_size: negatives kept (MoCo: 65536 on ImageNet; a few thousand on CIFAR).
        key_momentum: m in ``key = m * key + (1 - m) * query`` after each step (0.99-0.999).
        temperature: 0.2 in MoCo v2.
        symmetric: also use view 1 as query against view 0's key (twice the compute).
        views / optimizer / online / num_classes: as in ``SimCLR``.
    """

    # Buffers (register_buffer), which nn.Module's attribute lookup types as Tensor | Module.
    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        queue_size: int = 4096,
        key_momentum: float = 0.99,
        temperature: float = 0.2,
        symmetric: bool = False,
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
                "queue_size": (queue_size, COUNT),
                "key_momentum": (key_momentum, MOMENTUM),
                "temperature": (temperature, POSITIVE),
            },
        )
        self.backbone = BackboneSpec.of(backbone).build()
        self.projector = MLP([self.backbone.num_features, proj_hidden, proj_dim], batch_norm=True)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_projector = momentum_copy(self.projector)
        # Buffers: saved in checkpoints, so a resumed run continues with the same negatives.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.views = ViewSpec.of(views).build()
        self.online = OnlineEvaluation(OnlineSpec.of(online), self.backbone.num_features, num_classes)

    @property
    def hp(self) -> MoCoHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(MoCoHparams, self.hparams)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Query-encoder features of plain uint8 images (no augmentation): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    def momentum_update(self) -> None:
        """key = m * key + (1 - m) * query, for every weight and BatchNorm statistic."""
        momentum_update([self.backbone, self.projector], [self.key_backbone, self.key_projector], self.hp.key_momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Put the keys of every rank (N_global, D) into the queue, oldest first out."""
        keys = gather_no_grad(keys)
        k = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys[-k:] if keys.shape[0] > k else keys
        self.queue_ptr.fill_(int((self.queue_ptr + keys.shape[0]) % k))

    def info_nce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries q against their keys k (B, D, normalized) and the queue."""
        return info_nce(q, k, self.queue, self.hp.temperature)

    def loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE of queries from ``v0`` against keys from ``v1`` (and the reverse when
        symmetric), views (B, 3, S, S). Returns the loss, the query backbone's features of ``v0``
        (B, F) and the keys of ``v0``'s images (B, D), the next entries of the queue."""
        symmetric = self.hp.symmetric
        h = self.backbone(torch.cat([v0, v1]) if symmetric else v0)
        q = F.normalize(self.projector(h).float(), dim=1)
        with torch.no_grad():
            keys_in = torch.cat([v1, v0]) if symmetric else v1
            k = F.normalize(self.key_projector(self.key_backbone(keys_in)).float(), dim=1)
        b = v0.shape[0]
        return self.info_nce(q, k), h[:b], k[:b]

    @property
    def probe_input_norm(self) -> str:
        """Probes read the backbone as it saw its views: ImageNet channel statistics."""
        return "channel"

    def stream_sample(self, image_size: int) -> CropViews:
        """On a streamed dataset the workers cut the two crops from the full images."""
        return CropViews.of_views(self.views, image_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        v0, v1 = self.views.of_batch(batch)
        self.momentum_update()  # the key encoder moves before it encodes this batch's keys (MoCo, Alg. 1)
        loss, features, keys = self.loss(v0, v1)
        self.enqueue(keys)  # after the loss: this batch's keys are its positives, not yet negatives
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        # About 1 while images embed apart, 0 once all embed alike (collapse; CollapseWatch warns).
        self.log("train/embedding_spread", embedding_spread(keys), on_step=True, on_epoch=True, sync_dist=True)
        return loss + self.online.training_loss(self, features, batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed views per batch; the key encoder and queue stay as they are.
        validate_on_fixed_views(self, batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The key encoder follows by momentum, never by gradient.
        return OptimizerSpec.of(self.hp.optimizer).build([self.backbone, self.projector], self.online.param_groups())

    def configure_callbacks(self) -> list[L.Callback]:
        return [OnlineHooks(), ViewsFigure()]
