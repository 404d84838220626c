"""What the contrastive methods share: batched views on the device, the online evaluator,
and the optimiser (backbone, head and online probe in one optimiser)."""

from __future__ import annotations

import lightning as L
import torch

from selfsup.data.datamodule import say
from selfsup.data.views import SimCLRViews, normalize, to_float
from selfsup.media import log_training_figure, spread, view_pairs_grid
from selfsup.methods.common import configure_optimizers
from selfsup.methods.online import OnlineEvaluator, evaluation_due, frozen_evaluation


class ContrastiveMethod(L.LightningModule):
    """Base of SimCLR and MoCo. Subclasses build ``self.backbone``, implement
    :meth:`contrastive_loss` and :meth:`ssl_modules`, and end ``__init__`` with
    :meth:`init_online`. Hyperparameters ``view_size``, ``crop_min_scale``, ``num_classes``,
    ``online_eval``, ``online_lr``, ``knn_every`` and ``knn_k`` are read here."""

    def __init__(self) -> None:
        super().__init__()
        self.online: OnlineEvaluator | None = None
        # Labelled evaluation data separate from the (unlabeled) pretraining images: evaluated
        # on frozen features every ``knn_every`` epochs instead of by a head trained alongside.
        self._separate_eval = None
        self._separate_metrics: dict[str, float] = {}
        self._views: SimCLRViews | None = None

    def _build_online(self, num_classes: int) -> None:
        hp = self.hparams
        self.hparams["num_classes"] = num_classes  # saved, so a checkpoint rebuilds the head
        self.online = OnlineEvaluator(self.backbone.num_features, num_classes, knn_every=hp.knn_every, knn_k=hp.knn_k)

    def views(self, images: torch.Tensor) -> SimCLRViews:
        size = self.hparams.view_size or images.shape[-1]
        if self._views is None or self._views.image_size != size:
            self._views = SimCLRViews(size, scale=(self.hparams.crop_min_scale, 1.0))
        return self._views

    def contrastive_loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, backbone features of ``v0``) for two batches of views (B, 3, S, S)."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of plain uint8 images (no augmentation): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    # -- online evaluation ------------------------------------------------------------
    def init_online(self) -> None:
        """Build the online evaluator now when the class count is known (e.g. when loading a
        checkpoint); otherwise :meth:`setup` builds it from the datamodule."""
        if self.hparams.online_eval and self.hparams.num_classes is not None:
            self._build_online(self.hparams.num_classes)

    def setup(self, stage: str) -> None:
        if not self.hparams.online_eval or self.online is not None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "evaluation_data"):
            return
        ev = dm.evaluation_data
        if ev is None:  # no labels anywhere: nothing to evaluate, and no head of one class per image
            say("online evaluation off: the pretraining images have no labels; give labelled "
                "images with --data.eval_root DIR to monitor kNN and linear accuracy")
        elif ev is not dm:
            self._separate_eval = ev
            say(f"online evaluation on {ev.hparams.root} ({len(ev.train_set):,} train / "
                f"{len(ev.eval_set):,} eval images, {ev.num_classes} classes): kNN and a linear "
                f"classifier on frozen features every {self.hparams.knn_every} epochs")
        elif ev.num_classes >= 2:
            self._build_online(ev.num_classes)

    def on_validation_epoch_start(self) -> None:
        ev = self._separate_eval
        if ev is not None and not self.trainer.sanity_checking:
            if evaluation_due(self.current_epoch, self.trainer.max_epochs, self.hparams.knn_every):
                self._separate_metrics = frozen_evaluation(
                    self.embed, ev.train_set.images, ev.train_set.labels, ev.eval_set.images, ev.eval_set.labels,
                    ev.num_classes, self.device, knn_k=self.hparams.knn_k)
        if self.online is None:
            return
        self.online.clear_bank()
        dm = getattr(self.trainer, "datamodule", None)
        if (not self.trainer.sanity_checking and hasattr(dm, "train_set")
                and self.online.knn_due(self.current_epoch, self.trainer.max_epochs)):
            self.online.build_bank(self.embed, dm.train_set.images, dm.train_set.labels, self.device)

    def on_train_start(self) -> None:
        """Show what the network sees: 8 training images with their two views, as a W&B image
        (``train/views``) and ``train_views.png`` in the log folder."""
        def draw(train_set) -> torch.Tensor:
            images = train_set.images[spread(len(train_set), 8)].to(self.device)
            v0, v1 = self.views(images)(images, torch.Generator(device=self.device).manual_seed(0))
            return view_pairs_grid(images, v0, v1)

        log_training_figure(self.trainer, "train/views", draw, "rows: image, view 0, view 1")

    # -- steps ------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        v0, v1 = self.views(images)(images)
        loss, feats = self.contrastive_loss(v0, v1)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        if self.online is not None:
            probe_loss = self.online.train_loss(feats, batch["label"])
            self.log("train/online_top1", self.online.train_top1, on_step=False, on_epoch=True)
            loss = loss + probe_loss  # detached features: the probe never shapes the backbone
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        g = torch.Generator(device=images.device).manual_seed(1000 + batch_idx)
        loss, _ = self.contrastive_loss(*self.views(images)(images, g))
        self.log("val/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        if self.online is not None:
            self.online.update(self.embed(images), batch["label"])
            self.log("val/online_top1", self.online.online_top1, prog_bar=True)
            if self.online.has_bank:
                self.log("val/knn_top1", self.online.knn_top1, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self._separate_metrics:
            m = self._separate_metrics
            # Every rank computed the same figures on the same data; the mean keeps them in sync.
            self.log("val/knn_top1", m["knn_top1"], prog_bar=True, sync_dist=True)
            self.log("val/online_top1", m["linear_top1"], prog_bar=True, sync_dist=True)
            self._separate_metrics = {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        extra = []
        if self.online is not None:
            extra.append({"params": list(self.online.parameters()), "weight_decay": 0.0, "lars_exclude": True,
                          "lr": self.hparams.online_lr})
        return configure_optimizers(self, self.ssl_modules(), extra)

    def ssl_modules(self) -> list[torch.nn.Module]:
        """Modules trained by the contrastive loss."""
        raise NotImplementedError
