"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021)."""

from __future__ import annotations

from typing import Any, Protocol, cast

import lightning as L
import torch

from selfsup.config import COUNT, MOMENTUM, NON_NEGATIVE, POSITIVE, check_ranges, save_plain_hyperparameters
from selfsup.data.litdata.samples import CenterImage
from selfsup.data.views import MultiCropSpec, normalize, to_float
from selfsup.evaluation.online import OnlineEvaluation, OnlineHooks, OnlineSpec
from selfsup.losses.dino import DINOLoss
from selfsup.media import ViewsFigure
from selfsup.metrics import embedding_spread
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import DINOHead
from selfsup.models.momentum import cosine_momentum, momentum_copy, momentum_update
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import StageHparams


class DINOHparams(StageHparams, Protocol):
    """:class:`DINO`'s hyperparameters, read through :attr:`DINO.hp`."""

    out_dim: int
    teacher_momentum: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: int
    freeze_last_layer_epochs: int
    clip_grad: float
    weight_decay_end: float | None
    crops: dict
    online: dict
    num_classes: int | None


def without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its dropout and stochastic depth (timm's DropPath, e.g. from
    ``timm_kwargs.drop_path_rate``) switched off, in place; train mode stays for BatchNorm."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif hasattr(m, "drop_prob"):  # timm's DropPath and DropBlock
            cast(Any, m).drop_prob = 0.0
    return module


def clip_each_parameter(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient down to an L2 norm of at most ``max_norm``, one tensor at
    a time (DINO's ``clip_gradients``; not torch's clipping of the norm of all of them)."""
    for p in params:
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


class DINO(L.LightningModule):
    """A student (backbone and DINO head) learns to give every crop of an image the distribution
    that a momentum teacher gives the image's global crops; no labels, no negatives.

    Views (:class:`~selfsup.data.views.MultiCropViews`): 2 global crops go through both networks,
    the local crops through the student only; the loss (:class:`~selfsup.losses.dino.DINOLoss`)
    is the cross-entropy of the teacher's centred and sharpened softmax of each global crop and
    the student's softmax of every other crop, averaged over those pairs.

    The recipe's parts, each a function of the step or the epoch so that a resumed run continues
    them: the teacher's momentum rises from ``teacher_momentum`` to 1 on a cosine over the run's
    steps (the teacher moves once per optimizer step, before the step's first batch, as BYOL's
    target); the teacher's temperature rises linearly from ``warmup_teacher_temp`` to
    ``teacher_temp`` over the first ``warmup_teacher_temp_epochs`` epochs; the weight decay of the
    weights follows a cosine from the optimizer's ``weight_decay`` to ``weight_decay_end``; the
    head's last layer is frozen for the first ``freeze_last_layer_epochs`` epochs; each
    parameter's gradient is clipped to an L2 norm of ``clip_grad``.

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``); a ViT as in the paper
            (``timm:vit_small_patch16_224``; ``image_size`` / ``patch_size`` for small images),
            any backbone works.
        out_dim / hidden_dim / bottleneck_dim / norm_last_layer: the head
            (:class:`~selfsup.models.heads.DINOHead`; the paper: 65,536, 2048, 256, true).
        teacher_momentum: the teacher's momentum at the first step (0.996; 0.9995 at small batches).
        teacher_temp / warmup_teacher_temp / warmup_teacher_temp_epochs: the teacher's temperature
            (0.04 after a warm-up from 0.04 over 0 epochs; the paper goes up to 0.07 over 30).
        student_temp / center_momentum: the student's temperature (0.1) and the centre's momentum (0.9).
        freeze_last_layer_epochs: epochs the head's last layer does not train (1).
        clip_grad: each parameter's gradient norm at most this (3.0); 0: no clipping.
        weight_decay_end: the weight decay at the last step (0.4; the first: the optimizer's
            ``weight_decay``, 0.04); None: constant.
        crops: the multi-crop views (:class:`~selfsup.data.views.MultiCropSpec`).
        optimizer / online / num_classes: as in ``SimCLR`` (the paper: AdamW, lr 5e-4 per 256 images).
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        teacher_momentum: float = 0.996,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        weight_decay_end: float | None = 0.4,
        crops: MultiCropSpec = MultiCropSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(name="adamw", lr=5e-4, weight_decay=0.04),
        online: OnlineSpec = OnlineSpec(),
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        check_ranges(
            "model.init_args",
            {
                "out_dim": (out_dim, COUNT),
                "hidden_dim": (hidden_dim, COUNT),
                "bottleneck_dim": (bottleneck_dim, COUNT),
                "teacher_momentum": (teacher_momentum, MOMENTUM),
                "teacher_temp": (teacher_temp, POSITIVE),
                "warmup_teacher_temp": (warmup_teacher_temp, POSITIVE),
                "warmup_teacher_temp_epochs": (warmup_teacher_temp_epochs, NON_NEGATIVE),
                "student_temp": (student_temp, POSITIVE),
                "center_momentum": (center_momentum, MOMENTUM),
                "freeze_last_layer_epochs": (freeze_last_layer_epochs, NON_NEGATIVE),
                "clip_grad": (clip_grad, NON_NEGATIVE),
                "weight_decay_end": (weight_decay_end, NON_NEGATIVE),
            },
        )
        self.backbone = BackboneSpec.of(backbone).build()
        self.head = DINOHead(self.backbone.num_features, out_dim, hidden_dim, bottleneck_dim, norm_last_layer)
        # Only the student is regularised: DINO builds its teacher without stochastic depth.
        self.teacher_backbone = without_dropout(momentum_copy(self.backbone))
        self.teacher_head = momentum_copy(self.head)
        self.views = MultiCropSpec.of(crops).build()
        self.criterion = DINOLoss(out_dim, student_temp, center_momentum)
        self.online = OnlineEvaluation(OnlineSpec.of(online), self.backbone.num_features, num_classes)

    @property
    def hp(self) -> DINOHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(DINOHparams, self.hparams)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Student backbone features of plain uint8 images (no augmentation): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    @property
    def total_steps(self) -> float:
        return float(self.trainer.estimated_stepping_batches)

    def momentum(self) -> float:
        """The teacher's momentum at this step: ``teacher_momentum`` at the first, 1 at the last."""
        return cosine_momentum(self.global_step, self.total_steps, self.hp.teacher_momentum)

    def teacher_temperature(self) -> float:
        """The teacher's temperature in this epoch: linear from ``warmup_teacher_temp`` over the
        warm-up epochs (the paper's per-epoch schedule), then ``teacher_temp``."""
        hp = self.hp
        if self.current_epoch >= hp.warmup_teacher_temp_epochs:
            return hp.teacher_temp
        share = self.current_epoch / max(hp.warmup_teacher_temp_epochs - 1, 1)
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * share

    def weight_decay(self) -> float:
        """The weight decay at this step: a half cosine from the optimizer's to ``weight_decay_end``
        (the same ramp as the teacher's momentum)."""
        start = float(self.hp.optimizer["weight_decay"])
        end = self.hp.weight_decay_end
        return start if end is None else cosine_momentum(self.global_step, self.total_steps, start, end)

    def update_teacher(self) -> None:
        """teacher = m * teacher + (1 - m) * student, backbone and head."""
        momentum_update([self.backbone, self.head], [self.teacher_backbone, self.teacher_head], self.momentum())

    def loss(
        self, views: list[torch.Tensor], update_center: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DINO's loss of a batch's views (2 global (B, 3, G, G), then the local ones (B, 3, L, L));
        with the student backbone's features of the first global crop (B, F) and the teacher
        backbone's of both global crops (2B, F)."""
        b = views[0].shape[0]
        global_crops = torch.cat(views[:2])
        with torch.no_grad():
            teacher_features = self.teacher_backbone(global_crops)
            teacher = self.teacher_head(teacher_features).unflatten(0, (2, b))  # (2, B, K)
        # One pass per crop size: the global crops together, the local crops together.
        h = self.backbone(global_crops)
        student = [self.head(h)]
        if len(views) > 2:
            student.append(self.head(self.backbone(torch.cat(views[2:]))))
        out = torch.cat(student).unflatten(0, (len(views), b))  # (V, B, K)
        loss = self.criterion(teacher, out, self.teacher_temperature(), update_center)
        return loss, h[:b], teacher_features

    @property
    def probe_input_norm(self) -> str:
        """Probes read the backbone as it saw its views: ImageNet channel statistics."""
        return "channel"

    def stream_sample(self, image_size: int) -> CenterImage:
        """On a streamed dataset the workers decode each image at ``image_size``; the crops are
        cut from it on the device."""
        return CenterImage(image_size)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        decay = self.weight_decay()
        for optimizer in self.trainer.optimizers:
            # The first group holds the weights that decay (selfsup.optim.param_groups).
            optimizer.param_groups[0]["weight_decay"] = decay

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # once per optimizer step
            self.update_teacher()
        loss, features, teacher_features = self.loss(self.views(batch["image"]))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/teacher_momentum", self.momentum(), on_step=True, on_epoch=False)
        self.log("train/teacher_temp", self.teacher_temperature(), on_step=True, on_epoch=False)
        self.log("train/weight_decay", self.weight_decay(), on_step=True, on_epoch=False)
        # About 1 while images embed apart, 0 once all embed alike (collapse; CollapseWatch warns).
        spread = embedding_spread(teacher_features)
        self.log("train/embedding_spread", spread, on_step=True, on_epoch=True, sync_dist=True)
        return loss + self.online.training_loss(self, features, batch["label"])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After AMP's unscaling: the clip and the freeze see the true gradients.
        if self.hp.clip_grad > 0:
            clip_each_parameter([*self.backbone.parameters(), *self.head.parameters()], self.hp.clip_grad)
        if self.current_epoch < self.hp.freeze_last_layer_epochs:
            # No gradient, no step (and no weight decay) for the last layer in the first epochs.
            for p in self.head.last_layer.parameters():
                p.grad = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        # Crops drawn from a generator fixed per batch: the same every evaluation, so comparable.
        g = torch.Generator(device=images.device).manual_seed(1000 + batch_idx)
        loss = self.loss(self.views(images, g), update_center=False)[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        self.online.validation_update(self, self.embed(images), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The teacher follows by momentum, never by gradient.
        return OptimizerSpec.of(self.hp.optimizer).build([self.backbone, self.head], self.online.param_groups())

    def configure_callbacks(self) -> list[L.Callback]:
        return [OnlineHooks(), ViewsFigure()]
