"""The linear probe: a linear classifier on the frozen backbone's pooled features (cached), its
rate and weight decay chosen on held-out training images (``selfsup.evaluation.probe_search``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, Literal, Protocol, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from selfsup import SelfsupError
from selfsup.callbacks.lr import (
    LearningRateScaling,
    Warmup,
    global_batch_size,
    per_device_batch_size,
)
from selfsup.config import AREA, check_range, save_plain_hyperparameters
from selfsup.data.datamodule import ImageDataModule
from selfsup.data.litdata.samples import CenterImage, LabelOnly
from selfsup.evaluation.features import (
    Features,
    PerImageCorrect,
    embed_all_ranks,
    frozen_features,
    require_labels,
    transfer_backbone,
)
from selfsup.evaluation.probe_search import ProbeSearch, SearchResult, search_probe
from selfsup.media import ConfusionFigure, log_image, search_figure
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.optim.schedules import lr_factor
from selfsup.protocols import TransferHparams
from selfsup.trainer_attrs import callbacks_of, datamodule_of


def linear_head(num_features: int, num_classes: int, standardize: Literal["batch", "layer"] | None) -> nn.Module:
    """(B, F) features -> (B, C) logits: a linear layer, after a standardization of the features
    where ``standardize`` says so (a frozen backbone)."""
    linear = MLP([num_features, num_classes], init_scale=0.01)
    if standardize is None:
        return linear
    # Standardized features (BN without affine) make one learning rate fit every frozen
    # backbone; their statistics are fixed, so a cumulative average (momentum=None) gets them
    # exactly. Where the backbone asks for no batch statistics (GroupNorm: batch size 1 must
    # work) each feature vector is standardized on its own. Standardized features have squared
    # norm F, which multiplies the head's step by F under SGD: the probe configs use Adam,
    # which does not care.
    norm = (
        nn.LayerNorm(num_features, elementwise_affine=False)
        if standardize == "layer"
        else nn.BatchNorm1d(num_features, affine=False, momentum=None)
    )
    return nn.Sequential(norm, linear)


class Classifier(nn.Module):
    """A linear head on pooled features (B, F) -> logits (B, C), with its accuracies.

    Logs ``{split}/loss``, ``{split}/top1`` and, above 5 classes, ``{split}/top5`` (with 5
    classes or fewer top-5 is always 100%) for ``train``, ``val`` and ``test``: exact counts over
    the epoch, synced across ranks (torchmetrics).

    Args:
        standardize: ``batch`` or ``layer`` standardization of the features before the linear
            layer (a frozen backbone), or None (fine-tuning).
    """

    def __init__(self, num_features: int, num_classes: int, standardize: Literal["batch", "layer"] | None) -> None:
        super().__init__()
        if num_classes < 2:
            raise SelfsupError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.head = linear_head(num_features, num_classes, standardize)
        self.top_k: int | None = 5 if num_classes > 5 else None
        ks = [("top1", 1)] + ([(f"top{self.top_k}", self.top_k)] if self.top_k else [])
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("train", "val", "test")
                for name, k in ks
            }
        )
        # Of validation, drawn by selfsup.media.ConfusionFigure.
        self.confusion = MulticlassConfusionMatrix(num_classes)
        # Of validation, image by image: the pipeline's verdict compares backbones on it.
        self.val_correct = PerImageCorrect()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def step(
        self,
        module: L.LightningModule,
        features: torch.Tensor,
        labels: torch.Tensor,
        split: str,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the head on ``features`` (B, F); logs loss and accuracies of ``split``
        (and, with the images' ``rows``, which validation images it got right)."""
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels)
        train = split == "train"
        module.log(
            f"{split}/loss",
            loss,
            prog_bar=train,
            on_step=train,
            on_epoch=True,
            batch_size=labels.shape[0],
            sync_dist=not train,
        )
        for name in ("top1", f"top{self.top_k}") if self.top_k else ("top1",):
            metric = cast(Metric, self.metrics[f"{split}_{name}"])  # ModuleDict types its items as Module
            metric(logits, labels)
            module.log(f"{split}/{name}", metric, prog_bar=name == "top1", on_step=train, on_epoch=True)
        if split == "val":
            self.confusion.update(logits.detach(), labels)
            if rows is not None:
                self.val_correct.update(rows, logits.argmax(dim=1), labels)
        return loss


class LinearProbeHparams(TransferHparams, Protocol):
    """:class:`LinearProbe`'s hyperparameters, read through :attr:`LinearProbe.hp`."""

    cache_features: bool
    augment: bool
    crop_min_scale: float
    search: dict[str, Any]


class LinearProbe(L.LightningModule):
    """A linear classifier on the frozen backbone's pooled features.

    The backbone stays in eval mode (BatchNorm statistics frozen). With ``cache_features``
    each image's features are computed once and reused in later epochs, so a probe costs
    one backbone pass over the data plus cheap linear epochs. With a ``search``, the rate and
    weight decay are first chosen on a held-out tenth of the *training* images
    (:mod:`selfsup.evaluation.probe_search`), never on the evaluation split.

    Args:
        num_classes: classes of the labels; ``selfsup fit`` links it from the DataModule.
        backbone: which network (``selfsup.models.BackboneSpec``); None: the small CNN.
        features: :class:`Features`: the checkpoint (None: the random-init baseline), the input
            normalization and the backbone depth probed.
        cache_features: compute each image's features once.
        augment: the classic probe instead (``cache_features: false``): every epoch each
            training image is randomly cropped (scale ``crop_min_scale``..1) and flipped, then
            passed through the frozen backbone, as solo-learn and lightly probe.
        crop_min_scale: of ``augment``'s crops.
        search: :class:`selfsup.evaluation.probe_search.ProbeSearch`: the rates and weight decays tried
            (none by default: ``optimizer``'s are used).
        optimizer: ``selfsup.optim.OptimizerSpec`` (lr at the reference batch).
    The typed arguments are stored as plain dicts in the hyperparameters.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneSpec | None = None,
        features: Features = Features(),
        cache_features: bool = True,
        augment: bool = False,
        crop_min_scale: float = 0.35,
        search: ProbeSearch = ProbeSearch(),
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-3),
    ) -> None:
        if augment and cache_features:
            raise SelfsupError(
                "a probe with augment: true sees new crops every epoch, which a cache cannot hold: "
                "set cache_features: false as well (the classic probe)"
            )
        super().__init__()
        save_plain_hyperparameters(self)
        check_range("model.init_args.crop_min_scale", crop_min_scale, AREA)
        self.features_spec = Features.of(features)
        self.search_spec = ProbeSearch.of(search)
        self.backbone = transfer_backbone(backbone, self.features_spec).requires_grad_(False)
        # A GroupNorm backbone asks for no batch statistics anywhere: neither does its probe.
        self.standardize: Literal["batch", "layer"] = "layer" if BackboneSpec.of(backbone).norm == "group" else "batch"
        self.classifier = (
            Classifier(self.backbone.depth_features(self.features_spec.depth), num_classes, self.standardize)
            if num_classes is not None
            else None
        )
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: The setting the search chose (None: no search run).
        self.chosen: SearchResult | None = None

    @property
    def hp(self) -> LinearProbeHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(LinearProbeHparams, self.hparams)

    def _trained_classifier(self) -> Classifier:
        # setup's require_labels stops a probe built without num_classes before any step.
        assert self.classifier is not None
        return self.classifier

    def check_data(self, dm: L.LightningDataModule) -> None:
        require_labels(self, dm)

    def setup(self, stage: str) -> None:
        require_labels(self, datamodule_of(self.trainer))

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen BatchNorm statistics too
        return self

    @torch.no_grad()
    def _compute(self, images: torch.Tensor, crop_min_scale: float | None = None) -> torch.Tensor:
        return frozen_features(self.backbone, images, self.features_spec, crop_min_scale)

    @torch.no_grad()
    def features(self, batch: dict, split: str) -> torch.Tensor:
        """Frozen features of the batch's images (B, F), from the cache when computed before
        (a streamed batch then carries no images: :meth:`stream_sample`)."""
        images = batch.get("image")
        if split == "train" and self.hp.augment:
            assert images is not None  # stream_sample sends the images whenever the probe augments
            return self._compute(images, self.hp.crop_min_scale)
        # The cache is indexed by the image's row in its split, which ImageDataModule provides.
        dm = datamodule_of(self.trainer) if self._trainer is not None else None
        if not self.hp.cache_features or not isinstance(dm, ImageDataModule):
            assert images is not None  # only cached features come without their images
            return self._compute(images)
        idx = batch["index"]
        if split not in self._cache:
            train, evals = dm.splits()
            n = len(train if split == "train" else evals)
            f = self.backbone.depth_features(self.features_spec.depth)
            self._cache[split] = (
                torch.zeros(n, f, device=idx.device),
                torch.zeros(n, dtype=torch.bool, device=idx.device),
            )
        store, filled = self._cache[split]
        todo = ~filled[idx]
        if todo.any():
            assert images is not None  # a streamed batch of labels only has every feature cached
            store[idx[todo]] = self._compute(images[todo]).to(store.dtype)  # bf16 under autocast
            filled[idx[todo]] = True
        return store[idx]

    def stream_sample(self, image_size: int) -> CenterImage | LabelOnly:
        """What a streamed dataset's workers make of each training image: only its label when
        the features of every training image are cached already (the search computed them),
        else the center square."""
        cached = self._cache.get("train")
        if not self.hp.augment and cached is not None and bool(cached[1].all()):
            return LabelOnly()
        return CenterImage(image_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._trained_classifier().step(self, self.features(batch, "train"), batch["label"], "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._trained_classifier().step(self, self.features(batch, "val"), batch["label"], "val", batch.get("index"))

    def on_validation_epoch_end(self) -> None:
        if self.chosen is not None:  # so that trainer.validate returns the chosen setting too
            # The same on every rank (the search runs on all the features): reduce rather than
            # warn that an epoch-level value is not synced.
            for key in ("lr", "weight_decay", "holdout_top1"):
                self.log(f"search/{key}", float(getattr(self.chosen, key)), sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._trained_classifier().step(self, self.features(batch, "test"), batch["label"], "test")

    def per_image_correct(self) -> torch.Tensor:
        """Which evaluation images the last validation got right: bool (N,) by row."""
        return self._trained_classifier().val_correct.result()

    def run_search(self) -> SearchResult:
        """Choose the rate and weight decay (``search``) on held-out training images: every
        setting's head trains on the cached features of the other training images with the
        probe's batch, epochs, rate scaling and schedule; the training split's features stay in
        the cache for the probe itself."""
        trainer = self.trainer
        dm = datamodule_of(trainer)
        assert isinstance(dm, ImageDataModule)  # configure_optimizers searches only with one
        train = dm.splits()[0]
        if trainer.is_global_zero:
            print(
                f"probe search: features of {len(train)} training images, then "
                f"{len(self.search_spec.settings())} heads side by side",
                flush=True,
            )
        # Under DDP each rank computes an equal share and every rank gets all of them.
        feats = embed_all_ranks(trainer, self._compute, train.images, self.device)
        labels = train.labels.to(self.device)
        if self.hp.cache_features:
            self._cache["train"] = (feats, torch.ones(len(feats), dtype=torch.bool, device=feats.device))
        batch = per_device_batch_size(trainer)
        global_batch = global_batch_size(trainer, batch)
        epochs = search_epochs(trainer, len(feats), global_batch)
        num_classes = self.hp.num_classes
        assert num_classes is not None  # setup's require_labels
        result = search_probe(
            feats,
            labels,
            lambda: linear_head(feats.shape[1], num_classes, self.standardize),
            self.search_spec,
            OptimizerSpec.of(self.hp.optimizer),
            epochs=epochs,
            batch_size=global_batch,
            lr_at=trainer_schedule(trainer, batch, epochs),
            drop_last=bool(getattr(dm.hparams, "drop_last", True)),
        )
        # Every rank trains with rank zero's choice (floating-point ties could differ).
        return trainer.strategy.broadcast(result, src=0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        spec = OptimizerSpec.of(self.hp.optimizer)
        if self.search_spec.enabled and isinstance(datamodule_of(self.trainer), ImageDataModule):
            self.chosen = self.run_search()
            report_search(self.trainer, self.chosen)
            spec = replace(spec, lr=self.chosen.lr, weight_decay=self.chosen.weight_decay)
        elif self.search_spec.enabled:
            rank_zero_warn(
                "the probe's search reads the training split of an ImageDataModule, and this fit has "
                f"none: it trains with optimizer.lr={spec.lr!r} instead"
            )
        return spec.build([self._trained_classifier()])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.chosen is not None:  # a checkpoint found later says which setting trained it
            checkpoint["probe_search"] = asdict(self.chosen)

    def configure_callbacks(self) -> list[L.Callback]:
        return [ConfusionFigure()]


def search_epochs(trainer: L.Trainer, n_train: int, global_batch: int) -> int:
    """The epochs the probe will train: ``max_epochs``, else ``max_steps`` in epochs of
    ``n_train`` images, else (a time budget only) 30, the configs' probe length."""
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return int(trainer.max_epochs)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return max(1, math.ceil(trainer.max_steps / max(1, n_train // global_batch)))
    return 30


def trainer_schedule(trainer: L.Trainer, batch_per_device: int, epochs: int) -> Callable[[float, int, int], float]:
    """(base rate, step, total steps of ``epochs``) -> the rate the trainer's LearningRateScaling
    and Warmup callbacks would set at that optimizer step (the base rate alone without them)."""
    scaling = next((cb for cb in callbacks_of(trainer) if isinstance(cb, LearningRateScaling)), None)
    warmup = next((cb for cb in callbacks_of(trainer) if isinstance(cb, Warmup)), None)
    bounded = (trainer.max_epochs or 0) > 0 or (trainer.max_steps or 0) > 0

    def lr_at(base: float, step: int, total: int) -> float:
        lr = scaling.resolve(trainer, base, batch_per_device)[1] if scaling else base
        if warmup is None:
            return lr
        if warmup.warmup_steps is not None:
            warm = warmup.warmup_steps
        else:  # the search's epochs are shorter (a tenth held out): the same share of the run
            warm = round(warmup.warmup_epochs * total / epochs)
        # A run with a time budget only keeps its rate after warmup (Warmup's rule): so does the search.
        return lr * lr_factor(step, total if bounded else math.inf, warm, warmup.decay, warmup.final_fraction)

    return lr_at


def report_search(trainer: L.Trainer, result: SearchResult) -> None:
    """Say what the search chose: one line on rank zero, the whole table in every logger's run
    config (``probe_search``), and a picture (``search/holdout`` in W&B,
    ``search_holdout.png`` in the run folder)."""
    log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank
    if not trainer.is_global_zero:
        return
    print(result.describe(), flush=True)
    for logger in trainer.loggers:
        logger.log_hyperparams({"probe_search": asdict(result)})
    log_image(
        trainer,
        log_dir,
        "search/holdout",
        search_figure(result.table, (result.lr, result.weight_decay)),
        "held-out top-1 of every setting tried; framed: the one the probe trains with",
    )
