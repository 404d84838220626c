"""Relative patch location pretext task (Doersch, Gupta and Efros, ICCV 2015)."""

from __future__ import annotations

from typing import Literal, Protocol, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from selfsup import SelfsupError
from selfsup.config import COUNT, MOMENTUM, NON_NEGATIVE, PROBABILITY, check_ranges, save_plain_hyperparameters
from selfsup.data.datamodule import ImageDataModule
from selfsup.data.litdata.samples import RandomSquare
from selfsup.data.patches import (
    CENTER,
    GRID_PRESETS,
    NEIGHBORS,
    GridSpec,
    color_drop,
    grid_preset,
    normalize_patches,
    pair_labels,
    pixelate,
    random_grayscale_images,
    sample_patches,
)
from selfsup.data.views import normalize, to_float
from selfsup.evaluation.features import preprocess
from selfsup.evaluation.online import RankMeMonitor
from selfsup.media import draw_patches, log_training_figure, spread
from selfsup.models.backbones import BackboneSpec
from selfsup.models.heads import MLP
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import StageHparams
from selfsup.trainer_attrs import datamodule_of


class RelativeLocationHparams(StageHparams, Protocol):
    """:class:`RelativeLocation`'s hyperparameters, read through :attr:`RelativeLocation.hp`."""

    grid: Literal["doersch", "kolesnikov"]
    patch: int | None
    gap: int | None
    jitter: int | None
    gap_max: int | None
    per_patch_norm: bool
    color: Literal["drop", "gray", "none"]
    gray_p: float
    pixelate_p: float
    pairs: Literal["all", "one"]
    head_hidden: int
    dropout: float


class RelativeLocation(L.LightningModule):
    """Predict where a neighbor patch sits relative to the center patch (8 classes).

    Per image, a 3x3 grid of patches with a gap and jitter is cut on the training device;
    each of the 9 patches goes through the shared backbone once, and the center's features
    are paired with each neighbor's (all 8 pairs, or one random neighbor), concatenated
    and classified by an MLP. Labels follow ``selfsup.data.patches`` (0..7 in reading order).

    Args:
        backbone: which network (``selfsup.models.BackboneSpec``); None: the small CNN.
        grid: preset style for the image size, ``doersch`` or ``kolesnikov`` (see
            ``selfsup.data.patches.GRID_PRESETS``).
        patch / gap / jitter: grid geometry in pixels; None takes the preset's value.
        gap_max: draw the gap per image from ``gap..gap_max`` (None: fixed gap).
        per_patch_norm: standardize each patch (closes the low-level statistics shortcut);
            otherwise channel normalization.
        color: chromatic-aberration remedy: ``drop`` (Doersch: one random channel kept per
            patch, the others replaced by noise), ``gray`` (Kolesnikov: whole image to gray
            with probability ``gray_p``) or ``none``.
        pixelate_p: probability per patch of being downsampled and upsampled back (Doersch 1/3).
        pairs: ``all`` 8 pairs per image, or ``one`` random neighbor per image.
        head_hidden / dropout: the pair classifier, ``2F -> head_hidden (BN, ReLU, dropout) -> 8``.
        optimizer: ``selfsup.optim.OptimizerSpec`` (lr at the reference batch).
    The typed arguments are stored as plain dicts in the hyperparameters.
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        grid: Literal["doersch", "kolesnikov"] = "doersch",
        patch: int | None = None,
        gap: int | None = None,
        jitter: int | None = None,
        gap_max: int | None = None,
        per_patch_norm: bool = True,
        color: Literal["drop", "gray", "none"] = "drop",
        gray_p: float = 0.66,
        pixelate_p: float = 1 / 3,
        pairs: Literal["all", "one"] = "all",
        head_hidden: int = 512,
        dropout: float = 0.5,
        optimizer: OptimizerSpec = OptimizerSpec(lr=2e-3, weight_decay=1e-5),
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        check_ranges(
            "model.init_args",
            {
                "patch": (patch, COUNT),
                "gap": (gap, NON_NEGATIVE),
                "jitter": (jitter, NON_NEGATIVE),
                "gap_max": (gap_max, NON_NEGATIVE),
                "gray_p": (gray_p, PROBABILITY),
                "pixelate_p": (pixelate_p, PROBABILITY),
                "head_hidden": (head_hidden, COUNT),
                "dropout": (dropout, MOMENTUM),
            },
        )
        if pairs not in ("all", "one"):
            raise ValueError(f"pairs must be 'all' or 'one', got {pairs!r}")
        self.backbone = BackboneSpec.of(backbone).build()
        f = self.backbone.num_features
        self.head = MLP([2 * f, head_hidden, 8], batch_norm=True, dropout=dropout)
        # torchmetrics: counts over every pair of the epoch, summed across ranks under DDP
        # (not a mean of per-batch means). Metric states are not saved in checkpoints.
        self.pretext_top1 = nn.ModuleDict(
            {f"{k}_top1": MulticlassAccuracy(8, average="micro") for k in ("train", "val")}
        )

    @property
    def hp(self) -> RelativeLocationHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(RelativeLocationHparams, self.hparams)

    def grid_spec(self, image_size: int) -> GridSpec:
        hp = self.hp
        preset = grid_preset(image_size, hp.grid)
        return GridSpec(
            patch=hp.patch if hp.patch is not None else preset.patch,
            gap=hp.gap if hp.gap is not None else preset.gap,
            jitter=hp.jitter if hp.jitter is not None else preset.jitter,
            gap_max=hp.gap_max,
        )

    @property
    def probe_input_norm(self) -> Literal["channel", "per_image"]:
        """How a probe should normalize inputs for this backbone: as it saw its patches."""
        return "per_image" if self.hp.per_patch_norm else "channel"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of whole uint8 images (B, 3, H, W), normalized as the patches were: (B, F)."""
        return self.backbone(preprocess(images, self.probe_input_norm))

    def check_data(self, dm: L.LightningDataModule) -> None:
        """Stop before training when the images are too small for the patch grid, naming the
        smallest image size that works."""
        if not isinstance(dm, ImageDataModule):
            return
        size = dm.image_size
        hp = self.hp
        try:
            spec = self.grid_spec(size)
        except ValueError:  # no preset fits: the smallest preset's size is what works
            smallest = min(GRID_PRESETS[hp.grid])
            raise SelfsupError(
                f"relative location needs images of at least {smallest} px for its {hp.grid} grid; these are "
                f"{size} px: set data.image_size {smallest} or more"
            ) from None
        if spec.extent > size:
            raise SelfsupError(
                f"relative location's grid (patch {spec.patch}, gap {spec.gap_max or spec.gap}, jitter {spec.jitter}) "
                f"spans {spec.extent} px, but the images are {size} px: set data.image_size {spec.extent} or more, "
                "or a smaller patch, gap or jitter"
            )

    def setup(self, stage: str) -> None:
        dm = datamodule_of(self.trainer)
        if dm is not None:
            self.check_data(dm)

    def stream_sample(self, image_size: int) -> RandomSquare:
        """On a streamed dataset each image gives a square of its full height (or width) at a
        random place, decoded at ``image_size`` in the workers; the grid is drawn inside it."""
        return RandomSquare(image_size)

    def patches(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample and preprocess the 9 patches of each image: uint8 (B, 3, H, W) ->
        float (B, 9, 3, p, p) ready for the backbone, and the corners (B, 9, 2)."""
        hp = self.hp
        if hp.color == "gray":
            images = random_grayscale_images(images, hp.gray_p, generator)
        # Cut first, convert after: the patches hold fewer pixels than the images.
        patches, corners = sample_patches(images, self.grid_spec(images.shape[-1]), generator)
        patches = to_float(patches.flatten(0, 1)).view(patches.shape)
        if hp.pixelate_p > 0:
            patches = pixelate(patches, hp.pixelate_p, generator=generator)
        if hp.color == "drop":
            patches = color_drop(patches, generator)
        patches = normalize_patches(patches) if hp.per_patch_norm else normalize(patches.flatten(0, 1)).view_as(patches)
        return patches, corners

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 (B, 3, H, W) -> logits (B*P, 8) and labels (B*P,), P = 8 or 1."""
        b = images.shape[0]
        patches, _ = self.patches(images, generator)  # (B, 9, 3, p, p)
        feats = self.backbone(patches.flatten(0, 1)).view(b, 9, -1)  # each patch through the backbone once
        center = feats[:, CENTER : CENTER + 1]
        neighbors = feats[:, list(NEIGHBORS)]  # label order
        labels = pair_labels(b, images.device).view(b, 8)
        if self.hp.pairs == "one":
            gdev = generator.device if generator is not None else images.device
            pick = torch.randint(0, 8, (b, 1), generator=generator, device=gdev).to(images.device)
            neighbors = neighbors.gather(1, pick[..., None].expand(-1, -1, feats.shape[-1]))
            labels = pick
        pairs = torch.cat([center.expand_as(neighbors), neighbors], dim=-1)  # (B, P, 2F)
        logits = self.head(pairs.flatten(0, 1))
        return logits, labels.flatten()

    def on_train_start(self) -> None:
        """Show the sampling: 6 training images with their grids and patches, as a W&B image
        (``train/patches``) and ``train_patches.png`` in the log folder."""

        def draw(train_set) -> torch.Tensor:
            return draw_patches(self, train_set.images[spread(len(train_set), 6)].to(self.device))

        log_training_figure(
            self.trainer, "train/patches", draw, "grid: C center, 0-7 labels; below: the patches fed in"
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, labels = self(batch["image"])
        loss = F.cross_entropy(logits, labels)
        top1 = cast(Metric, self.pretext_top1["train_top1"])  # ModuleDict types its items as Module
        top1(logits, labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/pretext_top1", top1, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # A fixed generator per batch: the same patches every evaluation, comparable over epochs.
        g = torch.Generator(device=batch["image"].device).manual_seed(1000 + batch_idx)
        logits, labels = self(batch["image"], g)
        loss = F.cross_entropy(logits, labels)
        n = batch["image"].shape[0]
        top1 = cast(Metric, self.pretext_top1["val_top1"])
        top1(logits, labels)
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/pretext_top1", top1, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerSpec.of(self.hp.optimizer).build([self.backbone, self.head])

    def configure_callbacks(self) -> list[L.Callback]:
        return [RankMeMonitor()]  # val/rankme every epoch, as the two-view methods' OnlineHooks
