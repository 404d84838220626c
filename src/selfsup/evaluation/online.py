"""Online evaluation of a pretraining module: a linear head on detached features, trained by
the module's own optimizer alongside the self-supervised loss, and a kNN monitor; or, when the
labeled images are separate from the pretraining images, kNN and a linear classifier fitted
on frozen features. Besides, with or without labels, RankMe (the effective rank of the features
of a fixed set of images) every epoch: :class:`RankMeMonitor`, which :class:`OnlineHooks` is.

The evaluator is a part the module holds (``module.online``) and calls from its steps; its
per-epoch work runs from :class:`OnlineHooks`, which the module returns from
``configure_callbacks``. The head lives in the LightningModule (not in a callback with its own
optimizer), so it follows the module through DDP (part of the DDP-wrapped module; metrics sync
through torchmetrics) and through checkpoints and resume (weights and optimizer state saved
with everything else; the kNN bank is rebuilt from the training images when needed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from selfsup.config import COUNT, NON_NEGATIVE, PlainData, check_ranges
from selfsup.console import say
from selfsup.data.datamodule import ImageDataModule
from selfsup.evaluation.features import embed_all, embed_all_ranks
from selfsup.evaluation.knn import knn_scores
from selfsup.evaluation.probe_search import fit_heads
from selfsup.metrics import rankme
from selfsup.protocols import Embeds, HasOnline, LazyRows
from selfsup.trainer_attrs import datamodule_of


def evaluation_due(epoch: int, max_epochs: int | None, every: int) -> bool:
    """Whether epoch ``epoch`` (0-based) evaluates: every ``every`` epochs and on the last;
    never when ``every`` <= 0."""
    if every <= 0:
        return False
    return (epoch + 1) % every == 0 or (max_epochs is not None and epoch + 1 >= max_epochs)


def frozen_evaluation(
    embed: Callable[[torch.Tensor], torch.Tensor],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
    device: torch.device,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear_steps: int = 300,
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate a frozen backbone on labeled data that it was not trained on: weighted kNN
    (InstDisc: cosine, k=200, t=0.1, the whole training split as the bank) and a linear
    classifier fitted on standardized features (full-batch Adam, seeded).

    Used when the pretraining images have no labels and labeled evaluation data are given
    separately, so that no head can train alongside the pretext loss.

    Args:
        embed: uint8 (B, 3, H, W) on ``device`` -> features (B, F), in eval mode.
        train_*/eval_*: uint8 images (N, 3, H, W) and int64 labels (N,).
    Returns:
        ``knn_top1`` and ``linear_top1`` as fractions.
    """
    train = embed_all(embed, train_images, device)
    test = embed_all(embed, eval_images, device)
    ytr, yte = train_labels.to(device), eval_labels.to(device)
    correct = int((knn_scores(test, train, ytr, num_classes, knn_k, knn_temperature).argmax(1) == yte).sum())
    # Validation runs under inference mode: fit the classifier on ordinary (cloned) tensors.
    with torch.inference_mode(False), torch.enable_grad():
        train, test = train.clone(), test.clone()
        mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
        train, test = (train - mean) / std, (test - mean) / std
        g = torch.Generator(device="cpu").manual_seed(seed)
        head = nn.Linear(train.shape[1], num_classes).to(device)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
            head.bias.zero_()
        opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
        # Full-batch: one step an epoch over every training feature.
        fit_heads(nn.ModuleList([head]), opt, train, ytr.clone(), linear_steps, len(train), seed=seed)
        with torch.no_grad():
            linear = float((head(test).argmax(1) == yte).float().mean())
    return {"knn_top1": correct / max(1, len(test)), "linear_top1": linear}


@dataclass(frozen=True)
class OnlineSpec(PlainData):
    """How a pretraining stage evaluates itself while it trains (one typed argument).

    Args:
        enabled: train a linear head on detached features alongside (``val/online_top1``) and
            run the kNN monitor (``val/knn_top1``); with separate labeled data
            (``data.eval_root``), kNN and a linear classifier on frozen features instead.
        lr: base learning rate of the online head (scaled with the batch as the others).
        knn_every: evaluate kNN (and the separate data) every this many epochs and on the last; 0: never.
        knn_k: neighbors of the weighted kNN (InstDisc: 200).
    """

    enabled: bool = True
    lr: float = 1e-3
    knn_every: int = 5
    knn_k: int = 200

    def __post_init__(self) -> None:
        check_ranges(
            "model.init_args.online",
            {"lr": (self.lr, NON_NEGATIVE), "knn_every": (self.knn_every, NON_NEGATIVE), "knn_k": (self.knn_k, COUNT)},
        )


class OnlineEvaluation(nn.Module):
    """The online evaluator of a pretraining module with ``num_features`` pooled features.

    The module calls :meth:`training_loss` and :meth:`validation_update` from its steps and adds
    :meth:`param_groups` to its optimizer; :class:`OnlineHooks` does the per-epoch work. A head
    is built when ``num_classes`` (linked from the DataModule by ``selfsup fit``) is 2 or more.

    Args:
        spec: see :class:`OnlineSpec`.
        num_classes: classes of the pretraining images' labels; None: unlabeled, no head.
        knn_temperature: InstDisc's 0.1.
        knn_bank_size: None (the protocol): the whole training split is the bank; a number keeps
            a fixed subset of that many images (cheaper, not comparable with published figures).
    """

    def __init__(
        self,
        spec: OnlineSpec,
        num_features: int,
        num_classes: int | None,
        knn_temperature: float = 0.1,
        knn_bank_size: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes if spec.enabled and num_classes is not None and num_classes >= 2 else None
        self.head: nn.Module | None = None
        if self.num_classes is not None:
            self.head = nn.Sequential(
                nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, self.num_classes)
            )
            self.train_top1 = MulticlassAccuracy(self.num_classes, average="micro")
            self.online_top1 = MulticlassAccuracy(self.num_classes, average="micro")
            self.knn_top1 = MulticlassAccuracy(self.num_classes, average="micro")
        self.knn_t, self.knn_bank_size = knn_temperature, knn_bank_size
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        # Labeled data apart from the pretraining images (data.eval_root), and its figures.
        self.separate: ImageDataModule | None = None
        self._separate_metrics: dict[str, float] = {}

    @property
    def trains_head(self) -> bool:
        """Whether the head trains on the pretraining batches' labels."""
        return self.head is not None and self.separate is None

    def _trained_head(self) -> nn.Module:
        assert self.head is not None  # its callers check trains_head first
        return self.head

    # -- set-up -------------------------------------------------------------------------
    def attach(self, dm: object) -> None:
        """Choose what to evaluate on from the DataModule (one line says it): the pretraining
        images' own labels, separate labeled data, or nothing."""
        if not self.spec.enabled or not isinstance(dm, ImageDataModule):
            return
        ev = dm.evaluation_data
        if ev is None:  # no labels anywhere: nothing to evaluate, and no head of one class per image
            say(
                "online evaluation off: the pretraining images have no labels; give labeled "
                "images with --data.eval_root DIR to monitor kNN and linear accuracy"
            )
        elif ev is not dm:
            self.separate = ev
            if self.head is not None:  # its figures would mix with the separate ones: it rests
                self.head.requires_grad_(False)
            ev_train, ev_eval = ev.splits()
            say(
                f"online evaluation on {ev.hp.root} ({len(ev_train):,} train / "
                f"{len(ev_eval):,} eval images, {ev.num_classes} classes): kNN and a linear "
                f"classifier on frozen features every {self.spec.knn_every} epochs"
            )
        elif self.head is None:
            say(
                "online evaluation off: the module was built without num_classes (selfsup fit links it "
                "from the data; in Python pass num_classes=dm.num_classes)"
            )

    def param_groups(self) -> list[dict]:
        """The head's parameters for the module's optimizer: no weight decay, no LARS
        adaptation, the online rate."""
        if not self.trains_head:
            return []
        return [
            {
                "params": list(self._trained_head().parameters()),
                "weight_decay": 0.0,
                "lars_exclude": True,
                "lr": self.spec.lr,
            }
        ]

    # -- steps ------------------------------------------------------------------------
    def training_loss(self, module: L.LightningModule, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the head on detached features (B, F): the probe never shapes the
        backbone. Logs ``train/online_top1``; 0 when no head trains."""
        if not self.trains_head:
            return features.new_zeros(())
        logits = self._trained_head()(features.detach().float())
        self.train_top1.update(logits.detach(), labels)
        module.log("train/online_top1", self.train_top1, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def validation_update(self, module: L.LightningModule, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate and log the head's validation accuracy, and kNN's when a bank was built."""
        if not self.trains_head:
            return
        self.online_top1.update(self._trained_head()(features.float()), labels)
        module.log("val/online_top1", self.online_top1, prog_bar=True)
        if self._bank is not None:
            bank, bank_labels = self._bank
            assert self.num_classes is not None  # a head is built for its classes
            self.knn_top1.update(
                knn_scores(features, bank, bank_labels, self.num_classes, self.spec.knn_k, self.knn_t), labels
            )
            module.log("val/knn_top1", self.knn_top1, prog_bar=True)

    # -- per epoch (from OnlineHooks) -------------------------------------------------
    def epoch_start(
        self, trainer: L.Trainer, embed: Callable[[torch.Tensor], torch.Tensor], device: torch.device
    ) -> None:
        """Before validation: build the kNN bank, or evaluate the separate data, when due."""
        self._bank = None
        due = not trainer.sanity_checking and evaluation_due(
            trainer.current_epoch, trainer.max_epochs, self.spec.knn_every
        )
        if not due:
            return
        ev = self.separate
        if ev is not None:
            ev_train, ev_eval = ev.splits()
            # ImageDataModule.setup stops separate data of fewer than 2 classes.
            assert ev.num_classes is not None
            with trainer.precision_plugin.forward_context():  # as embed_all_ranks: the run's precision
                self._separate_metrics = frozen_evaluation(
                    embed,
                    ev_train.images,
                    ev_train.labels,
                    ev_eval.images,
                    ev_eval.labels,
                    ev.num_classes,
                    device,
                    knn_k=self.spec.knn_k,
                    knn_temperature=self.knn_t,
                )
            return
        dm = datamodule_of(trainer)
        if self.trains_head and isinstance(dm, ImageDataModule):
            bank = dm.splits()[0]
            if self.knn_bank_size is not None and len(bank) > self.knn_bank_size:
                bank = bank.subset(
                    torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: self.knn_bank_size]
                )
            self._bank = (embed_all_ranks(trainer, embed, bank.images, device), bank.labels.to(device))

    def epoch_end(self, module: L.LightningModule) -> None:
        """After validation: log the separate data's figures under the online names."""
        if self._separate_metrics:
            m, self._separate_metrics = self._separate_metrics, {}
            # Every rank computed the same figures on the same data; the mean keeps them in sync.
            module.log("val/knn_top1", m["knn_top1"], prog_bar=True, sync_dist=True)
            module.log("val/online_top1", m["linear_top1"], prog_bar=True, sync_dist=True)


#: Images RankMe is measured on each epoch: one cheap pass. The rank is at most min(N, D), so with
#: wide features (ResNet-50: 2048) it reads low against the paper's figures: a trend over the
#: epochs of one run, comparable between runs with the same count.
RANKME_IMAGES = 1024


def validate_on_fixed_views(module: L.LightningModule, batch: dict, batch_idx: int) -> None:
    """A two-view method's validation step (SimCLR, MoCo, BYOL, VICReg): its loss on views drawn
    from a generator fixed per batch, the same every evaluation and so comparable over epochs,
    logged as ``val/loss``; and the online evaluator's update on the plain images' features.
    ``module`` offers ``views``, ``loss(v0, v1) -> (loss, ...)``, ``embed`` and ``online``."""
    images = batch["image"]
    g = torch.Generator(device=images.device).manual_seed(1000 + batch_idx)
    m = cast(Any, module)
    loss = m.loss(*m.views(images, g))[0]
    module.log("val/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
    m.online.validation_update(module, m.embed(images), batch["label"])


def rankme_images(dm: ImageDataModule, count: int = RANKME_IMAGES) -> tuple[str, torch.Tensor]:
    """The fixed images RankMe is measured on, the same every epoch, and the split they come from:
    up to ``count`` of the evaluation split (``val``), or of the training split (``train``) when
    the evaluation split is empty. uint8 (n, 3, H, W), or streamed rows (``LazyRows``)."""
    train, evaluation = dm.splits()
    split, images = ("val", evaluation.images) if len(evaluation) > 0 else ("train", train.images)
    n = min(count, len(images))
    if isinstance(images, LazyRows):
        # Streamed splits are stored in a seeded random order (selfsup.data.litdata.write): the
        # first rows are a random sample, and reading them touches the fewest chunks.
        return split, cast(torch.Tensor, images.rows(0, n))
    # A decoded folder is stored class by class: evenly spaced rows see every class.
    return split, images[torch.linspace(0, len(images) - 1, n).round().long()] if n < len(images) else images


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (BatchNorm reads its running statistics and updates none),
    then each one's own flag back: a frozen part that trains in eval mode stays so."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class RankMeMonitor(L.Callback):
    """RankMe (:func:`selfsup.metrics.rankme`; Garrido et al., ICML 2023) of a pretraining
    module's features (``embed``: uint8 images -> (B, F), in eval mode) on fixed images
    (:func:`rankme_images`, at most ``count``), logged as ``val/rankme`` (``train/rankme`` when
    the images are the training split's) at the end of every training epoch and of ``validate``.

    A label-free health signal: it rises while the features spread over more directions and
    falls to 1 when every image embeds alike (``CollapseWatch`` warns). Under DDP every rank
    embeds a share and computes it from all the features; the logged value is synced (their max),
    so every rank holds the same. Needs an ``ImageDataModule``; otherwise nothing is logged.
    """

    def __init__(self, count: int = RANKME_IMAGES) -> None:
        self.count = count

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """Embed the fixed images, log their RankMe and return it (None: no images or no ``embed``).
        A collective call under DDP: every rank calls it."""
        dm = datamodule_of(trainer)
        if not isinstance(pl_module, Embeds) or not isinstance(dm, ImageDataModule):
            return None
        # Chosen again each time (an index, no decoding), the same rows every time: nothing held.
        split, images = rankme_images(dm, self.count)
        if len(images) == 0:
            return None
        with _eval_mode(pl_module):
            z = embed_all_ranks(trainer, pl_module.embed, images, pl_module.device)
        value = rankme(z)
        # Every rank computed it from the same gathered features; the max of equal values is
        # that value exactly, and makes the ranks agree even if their SVDs rounded differently.
        pl_module.log(f"{split}/rankme", value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        return value

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every epoch, whatever the validation cadence; after that epoch's validation.
        self.measure(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # In fit, on_train_epoch_end measures (once an epoch); validate alone has no training epoch.
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.measure(trainer, pl_module)


class OnlineHooks(RankMeMonitor):
    """The per-epoch work of ``pl_module.online`` (an :class:`OnlineEvaluation`); a module
    returns it from ``configure_callbacks`` and calls ``embed`` (uint8 images -> features).
    As a :class:`RankMeMonitor` it logs RankMe every epoch too, labels or not, evaluator enabled
    or not."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _online(pl_module).attach(datamodule_of(trainer))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        embed = cast(HasOnline, pl_module).embed  # a module that holds the evaluator embeds
        _online(pl_module).epoch_start(trainer, embed, pl_module.device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _online(pl_module).epoch_end(pl_module)
        super().on_validation_epoch_end(trainer, pl_module)


def _online(pl_module: L.LightningModule) -> OnlineEvaluation:
    """The evaluator of a module that returns OnlineHooks (``HasOnline.online``); nn.Module types
    a submodule it looks up as ``Tensor | Module``."""
    return cast(OnlineEvaluation, pl_module.online)
