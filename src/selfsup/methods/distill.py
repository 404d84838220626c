"""Distillation from a frozen teacher (Beyer et al., "Knowledge distillation: A good teacher is
patient and consistent", CVPR 2022; the recipe of lightly-train's ``distillation`` v2)."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from selfsup.config import COUNT, POSITIVE, check_ranges, save_plain_hyperparameters
from selfsup.data.litdata.samples import CropViews
from selfsup.data.views import ViewSpec, normalize, to_float
from selfsup.evaluation.online import OnlineEvaluation, OnlineHooks, OnlineSpec
from selfsup.media import ViewsFigure
from selfsup.metrics import embedding_spread
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import DistillHparams


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared distance between the L2-normalized student projections and teacher features,
    summed over features and averaged over the batch: ``mean_i ||s_i/|s_i| - t_i/|t_i| ||^2``,
    which equals ``2 - 2 cos(s_i, t_i)`` averaged (0 when aligned, 4 when opposite).

    Args:
        student: (B, D) projections of the student (gradients flow).
        teacher: (B, D) features of the teacher on the same inputs (constants).
    Returns:
        the scalar loss, in fp32 whatever the autocast dtype.
    """
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()


def mixup(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) as function matching uses it (Beyer et al. 2022, lightly-train):
    each image blended with another image of the batch, one weight ``lam ~ U(0, 1)`` per batch.

    Args:
        x: (B, 3, S, S) views.
    Returns:
        the mixed views ``lam * x + (1 - lam) * x[perm]`` (B, 3, S, S), ``lam`` (a 0-d tensor on
        x's device: no host sync) and ``perm`` (B,).
    """
    lam = torch.rand((), device=x.device)
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], lam, perm


class Distill(L.LightningModule):
    """The student (``backbone``) learns to give, through a projection head, the features that a
    frozen teacher gives for the very same augmented (and mixed) view.

    Recipe: lightly-train's default ``distillation`` method as its documentation describes v2
    (LightlyTrain 0.7-0.14: "a mean squared error loss between the features of the student and
    teacher networks when processing the same image", with "strong, identical augmentations" for
    both, after Beyer et al. 2022), and as its code does it: one view per image, mixup of the
    views with one weight per batch, a linear projection from the student's width to the
    teacher's, LARS (lr 1.5 x batch / 256, weight decay 1e-6) and gradient-norm clipping at 1.
    What is changed, so that any teacher works (a torchvision or timm model, a selfsup checkpoint):
    the features are the pooled (B, F) features every selfsup backbone gives, not DINOv2's patch
    tokens of its last two blocks against the student's resized feature map; and both sides are
    L2-normalized before the squared error (DINOv2's tokens come layer-normalized, a CNN's pooled
    features at any scale), so the loss is ``2 - 2 cos`` (:func:`distillation_loss`) and its scale
    does not depend on the teacher. Not the label-free v1 (a queue of teacher features as a
    pseudo-classifier, KL divergence) nor Beyer et al.'s KL on a labelled teacher's logits.

    The teacher is frozen: built once from ``teacher`` (its ``weights`` file), ``requires_grad``
    off, outside the optimizer, kept in eval mode (BatchNorm keeps its running statistics even
    when Lightning calls ``model.train()``), run under ``torch.no_grad()`` inside the step, so at
    the trainer's precision. It is held as ``teacher`` (never under ``backbone.``) and left out of
    checkpoints (it is an input, named by its file): on resume it comes from that file again.

    Args:
        backbone: the student (``selfsup.models.BackboneSpec``), random or from ``weights`` of
            its own; None: the small CNN. Later stages, probes and export read it.
        teacher: the frozen teacher (``BackboneSpec``, e.g. ``{name: resnet50, weights: PATH}``);
            it sees the student's views, normalized with ImageNet statistics. Without
            ``weights`` it is a random network (a warning says so); None: the small CNN.
        proj_hidden: None: a linear projection ``F_student -> F_teacher`` (lightly-train); a
            width: ``F_student -> proj_hidden (BN, ReLU) -> F_teacher``.
        mixup: mix the views (function matching); the online head then trains on the mixup
            cross-entropy ``lam CE(y) + (1 - lam) CE(y[perm])``.
        grad_clip: clip the gradient norm of student and projection head to this (lightly-train:
            1.0); None: no clipping. A trainer ``gradient_clip_val`` replaces it.
        views / optimizer / online / num_classes: as in ``SimCLR`` (one view per image is used).
    The typed arguments are stored as plain dicts in the hyperparameters.
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        teacher: BackboneSpec | None = None,
        proj_hidden: int | None = None,
        mixup: bool = True,
        grad_clip: float | None = 1.0,
        views: ViewSpec = ViewSpec(crop_min_scale=0.14),
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-3, weight_decay=1e-6),
        online: OnlineSpec = OnlineSpec(),
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        check_ranges("model.init_args", {"proj_hidden": (proj_hidden, COUNT), "grad_clip": (grad_clip, POSITIVE)})
        self.backbone = BackboneSpec.of(backbone).build()
        spec = BackboneSpec.of(teacher)
        if not spec.weights:
            rank_zero_warn(
                f"distillation: the teacher ({spec.name}) has no weights, so the student learns to copy a random "
                "network; set model.init_args.teacher.weights to a weights file"
            )
        self.teacher = spec.build().requires_grad_(False).eval()
        s, t = self.backbone.num_features, self.teacher.num_features
        # Small weights as lightly-train's (truncated normal, std 0.02): the projection starts near zero.
        self.projector = (
            MLP([s, t], init_scale=0.02) if proj_hidden is None else MLP([s, proj_hidden, t], batch_norm=True)
        )
        self.views = ViewSpec.of(views).build()
        self.online = OnlineEvaluation(OnlineSpec.of(online), s, num_classes)

    @property
    def hp(self) -> DistillHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(DistillHparams, self.hparams)

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        # Lightning calls model.train() after every validation: the teacher's BatchNorm must keep
        # normalizing with its running statistics (and never update them), its dropout stay off.
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, 3, S, S) -> student projections (B, F_teacher)."""
        return self.projector(self.backbone(x))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Student features of plain uint8 images (no augmentation): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distillation loss on one batch of views (B, 3, S, S), both networks on the same
        input; with the student's features (B, F), its projections (B, F_teacher) and the
        teacher's features (B, F_teacher)."""
        with torch.no_grad():
            target = self.teacher(x)
        h = self.backbone(x)
        z = self.projector(h)
        return distillation_loss(z, target), h, z, target

    def view(self, batch: dict) -> torch.Tensor:
        """The one view per image of a training batch: cut here from ``image`` uint8 (B, 3, H, W),
        or finished from the crop the workers cut from the full image, ``views`` (B, 1, 3, S, S)."""
        with torch.no_grad():
            if "views" in batch:
                return self.views.finish(batch["views"][:, 0])
            return self.views.view(batch["image"])

    @property
    def probe_input_norm(self) -> str:
        """Probes read the student as it saw its views: ImageNet channel statistics."""
        return "channel"

    def stream_sample(self, image_size: int) -> CropViews:
        """On a streamed dataset the workers cut the one crop from the full images."""
        v = self.views
        return CropViews(1, v.image_size or image_size, v.scale, v.ratio)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, labels = self.view(batch), batch["label"]
        if self.hp.mixup:
            x, lam, perm = mixup(x)
        loss, features, z, target = self.loss(x)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        # About 1 while images embed apart, 0 once all embed alike (collapse; CollapseWatch warns).
        self.log("train/embedding_spread", embedding_spread(z), on_step=True, on_epoch=True, sync_dist=True)
        # The spread the student is taught: pooled ReLU features share a large mean direction (a
        # random ResNet-50's spread is about 0.1), so a low student spread may be the teacher's own.
        self.log("train/teacher_spread", embedding_spread(target), on_step=False, on_epoch=True, sync_dist=True)
        if not self.hp.mixup:
            return loss + self.online.training_loss(self, features, labels)
        # A mixed image carries both labels; train/online_top1 counts it against each of them.
        online = lam * self.online.training_loss(self, features, labels)
        return loss + online + (1 - lam) * self.online.training_loss(self, features, labels[perm])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        # A fixed generator per batch and no mixup: the same views every evaluation, comparable over epochs.
        g = torch.Generator(device=images.device).manual_seed(1000 + batch_idx)
        loss = self.loss(self.views.view(images, g))[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        self.online.validation_update(self, self.embed(images), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The teacher is not in it: it never changes.
        return OptimizerSpec.of(self.hp.optimizer).build([self.backbone, self.projector], self.online.param_groups())

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val is not None:  # the trainer's own setting
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif self.hp.grad_clip is not None:
            # Student and projection only: the online head's gradients never shrink the student's.
            # Under fp16 mixed precision Lightning has unscaled the gradients before this hook.
            params = [p for m in (self.backbone, self.projector) for p in m.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.hp.grad_clip)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is an input named by its weights file, not a result (a ResNet-50 would add
        # 100 MB to every checkpoint); backbone.* (the student) and the head stay.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Put back the teacher built from its file, so that the strict load finds every key.
        state = checkpoint["state_dict"]
        state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items() if f"teacher.{k}" not in state})

    def configure_callbacks(self) -> list[L.Callback]:
        return [OnlineHooks(), ViewsFigure()]
