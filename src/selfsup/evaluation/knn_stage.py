"""kNN evaluation of a frozen backbone as a stage (Wu, Xiong, Yu and Lin, CVPR 2018: InstDisc's protocol)."""

from __future__ import annotations

from typing import Protocol, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from selfsup import SelfsupError
from selfsup.config import POSITIVE, check_range, save_plain_hyperparameters
from selfsup.data.datamodule import ImageDataModule
from selfsup.evaluation.features import (
    Features,
    PerImageCorrect,
    embed_all_ranks,
    frozen_features,
    require_labels,
    transfer_backbone,
)
from selfsup.evaluation.knn import knn_scores_multi
from selfsup.media import log_image, neighbors_grid, spread
from selfsup.models.backbones import BackboneSpec
from selfsup.protocols import TransferHparams
from selfsup.trainer_attrs import datamodule_of


class KNNEvaluationHparams(TransferHparams, Protocol):
    """:class:`KNNEvaluation`'s hyperparameters, read through :attr:`KNNEvaluation.hp`."""

    k: tuple[int, ...]
    temperature: float


class KNNEvaluation(L.LightningModule):
    """Classify each evaluation image by its k most cosine-similar training images, each voting
    for its class with weight exp(similarity / temperature); the bank is the whole training split
    (as InstDisc, lightly and solo-learn report it), searched in chunks so memory stays bounded.

    Nothing trains: run it with ``selfsup validate`` (or as a pipeline evaluation with
    ``max_epochs: 0``). Logs ``val/top1`` and, above 5 classes, ``val/top5`` for the first k,
    and ``val/top1_k<k>`` for the others (the classes' count from the data, as a probe's).

    Args:
        num_classes: classes of the labels; ``selfsup fit`` / ``validate`` link it from the data.
        backbone / features: as ``LinearProbe``'s (``selfsup.evaluation.Features``).
        k: neighbor counts, the first one reported as ``top1`` (InstDisc: 200; 20 is also common).
        temperature: of the vote weights (InstDisc: 0.1).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneSpec | None = None,
        features: Features = Features(),
        k: tuple[int, ...] = (200, 20),
        temperature: float = 0.1,
    ) -> None:
        if not k or min(k) < 1:
            raise SelfsupError(f"model.init_args.k must name one or more neighbor counts of 1 or more, got {list(k)}")
        check_range("model.init_args.temperature", temperature, POSITIVE)
        super().__init__()
        save_plain_hyperparameters(self)
        self.features_spec = Features.of(features)
        self.backbone = transfer_backbone(backbone, self.features_spec).requires_grad_(False)
        self.ks = tuple(k)
        self.num_classes = num_classes
        if num_classes is not None:
            self.top1 = nn.ModuleList([MulticlassAccuracy(num_classes, average="micro") for _ in self.ks])
            self.top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.val_correct = PerImageCorrect()  # of the first k, for the pipeline's verdict

    @property
    def hp(self) -> KNNEvaluationHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(KNNEvaluationHparams, self.hparams)

    def _data(self) -> ImageDataModule:
        """The trainer's ImageDataModule: its training split is the bank."""
        dm = datamodule_of(self.trainer)
        if not isinstance(dm, ImageDataModule):
            raise SelfsupError("KNNEvaluation reads its bank from an ImageDataModule's training split: run it with one")
        return dm

    def check_data(self, dm: L.LightningDataModule) -> None:
        require_labels(self, dm)

    def setup(self, stage: str) -> None:
        require_labels(self, datamodule_of(self.trainer))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features of uint8 images (B, 3, H, W): (B, F), normalized as in pretraining."""
        return frozen_features(self.backbone, images, self.features_spec)

    def on_validation_epoch_start(self) -> None:
        self._bank = None
        if not self.trainer.sanity_checking:  # every training image, each embedded once
            train = self._data().splits()[0]
            self._bank = (
                embed_all_ranks(self.trainer, self.embed, train.images, self.device),
                train.labels.to(self.device),
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self._bank is None:
            return
        y = batch["label"]
        assert self.num_classes is not None  # setup's require_labels
        scores = knn_scores_multi(
            self.embed(batch["image"]), *self._bank, self.num_classes, self.ks, self.hp.temperature
        )
        for i, (k, module) in enumerate(zip(self.ks, self.top1, strict=True)):
            metric = cast(Metric, module)  # ModuleList types its items as Module
            metric(scores[k], y)
            self.log("val/top1" if i == 0 else f"val/top1_k{k}", metric, prog_bar=i == 0)
        if self.top5 is not None:
            self.top5(scores[self.ks[0]], y)
            self.log("val/top5", self.top5)
        if "index" in batch:
            self.val_correct.update(batch["index"], scores[self.ks[0]].argmax(dim=1), y)

    def per_image_correct(self) -> torch.Tensor:
        """Which evaluation images the last validation got right (the first k): bool (N,) by row."""
        return self.val_correct.result()

    def on_validation_epoch_end(self) -> None:
        """Show what kNN looks at: 8 evaluation images with their 8 nearest training images
        (framed green when of the query's class, red when not), as ``val/neighbors`` in W&B
        and ``val_neighbors.png`` in the run folder."""
        if self._bank is None:
            return
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective call: every rank
        if not self.trainer.is_global_zero:
            return
        train, evals = self._data().splits()
        pick = spread(len(evals), min(8, len(evals)))
        queries = evals.images[pick]
        bank, bank_labels = self._bank
        sims = F.normalize(self.embed(queries.to(self.device)).float(), dim=1) @ F.normalize(bank, dim=1).T
        nearest = sims.topk(min(8, len(bank)), dim=1).indices.cpu()
        correct = train.labels[nearest] == evals.labels[pick][:, None]
        log_image(
            self.trainer,
            log_dir,
            "val/neighbors",
            neighbors_grid(queries, train.images[nearest], correct),
            "left: evaluation image; right: its nearest training images (green: same class)",
        )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing to train: the bank is built when evaluating."""
        return None

    def configure_optimizers(self) -> None:
        return None
