"""MoCo v2: momentum contrast with a queue of negatives (He et al. 2020; Chen et al. 2020, v2)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_no_grad
from selfsup.methods.common import OptimizerName
from selfsup.methods.contrastive import ContrastiveMethod
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP


class MoCo(ContrastiveMethod):
    """Queries from the trained encoder, keys from its momentum (EMA) copy; negatives from a
    queue of past keys, so small per-device batches (one GPU, a CPU) still see many negatives.

    Loss for each query q with its key k+ and queue entries k_j (all L2-normalised):
    ``-log( exp(q.k+ / t) / (exp(q.k+ / t) + sum_j exp(q.k_j / t)) )``. Keys are gathered
    from every rank without gradient before they enter the queue, so the queue is identical
    on all ranks. The key encoder's BatchNorm sees only the local batch (no shuffle-BN).

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``: name, cifar_stem, width, norm);
            None: the small CNN. Stored as a plain dict in the hyperparameters.
        queue_size: negatives kept (MoCo: 65536 on ImageNet; a few thousand on CIFAR).
        key_momentum: m in ``key = m * key + (1 - m) * query`` after each step (0.99-0.999).
        temperature: 0.2 in MoCo v2.
        symmetric: also use view 1 as query against view 0's key (twice the compute).
        optimizer / lr / ...: see ``selfsup.methods.common.configure_optimizers`` (lr at the reference batch).
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        queue_size: int = 4096,
        key_momentum: float = 0.99,
        temperature: float = 0.2,
        symmetric: bool = False,
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
        if not 0 <= key_momentum < 1:
            raise ValueError(f"key_momentum must be in [0, 1), got {key_momentum}")
        self.backbone = BackboneSpec.of(backbone).build()
        self.projector = MLP([self.backbone.num_features, proj_hidden, proj_dim], batch_norm=True)
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        # Buffers: saved in checkpoints, so a resumed run continues with the same negatives.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.init_online()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key = m * key + (1 - m) * query, for every weight; BatchNorm statistics are copied
        the same way (they are buffers of the encoder)."""
        m = self.hparams.key_momentum
        for q_mod, k_mod in ((self.backbone, self.key_backbone), (self.projector, self.key_projector)):
            for q, k in zip(q_mod.state_dict().values(), k_mod.state_dict().values(), strict=True):
                if k.dtype.is_floating_point:
                    k.mul_(m).add_(q.detach(), alpha=1 - m)
                else:
                    k.copy_(q)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Put the keys of every rank (N_global, D) into the queue, oldest first out."""
        keys = gather_no_grad(keys)
        k = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys[-k:] if keys.shape[0] > k else keys
        self.queue_ptr.fill_(int((self.queue_ptr + keys.shape[0]) % k))

    def info_nce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k: (B, D) normalised; the positive sits in column 0."""
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ self.queue.clone().detach().T
        logits = torch.cat([pos, neg], dim=1) / self.hparams.temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    def contrastive_loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        symmetric = self.hparams.symmetric
        queries = torch.cat([v0, v1]) if symmetric else v0
        h = self.backbone(queries)
        q = F.normalize(self.projector(h).float(), dim=1)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            keys_in = torch.cat([v1, v0]) if symmetric else v1
            k = F.normalize(self.key_projector(self.key_backbone(keys_in)).float(), dim=1)
        loss = self.info_nce(q, k)
        if self.training:
            self.enqueue(k[: v0.shape[0]])
        return loss, h[: v0.shape[0]]

    def ssl_modules(self) -> list[torch.nn.Module]:
        return [self.backbone, self.projector]
