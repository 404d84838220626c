"""What an evaluation reads from a backbone: which weights, which depth, normalized how, and the
passes that embed a whole split (shared out over the job's ranks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import lightning as L
import torch
from torch import nn

from selfsup import SelfsupError
from selfsup.config import PlainData
from selfsup.data.datamodule import ImageDataModule
from selfsup.data.patches import normalize_patches
from selfsup.data.views import normalize, random_resized_crop, to_float
from selfsup.distributed import gather_no_grad
from selfsup.models.backbones import AnyBackbone, BackboneSpec
from selfsup.models.weights import load_backbone
from selfsup.protocols import LazyRows

InputNorm = Literal["channel", "per_image"]


def preprocess(images: torch.Tensor, input_norm: InputNorm) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalized as the backbone saw its inputs in pretraining:
    ImageNet channel statistics, or each image standardized (relative location's per-patch norm)."""
    x = to_float(images)
    return normalize_patches(x) if input_norm == "per_image" else normalize(x)


@dataclass(frozen=True)
class Features(PlainData):
    """Which features a transfer stage reads (one typed argument of LinearProbe, FineTune and
    KNNEvaluation; a plain dict in the checkpoint).

    Args:
        checkpoint: a checkpoint of an earlier stage; its ``backbone.*`` weights are loaded
            strictly. None: the random initialization (the baseline).
        input_norm: ``channel`` (ImageNet statistics) or ``per_image`` standardization, as the
            backbone saw its inputs in pretraining (relative location: ``per_image``).
        depth: the backbone layer whose pooled output is read (-1: the last; -2: the one before,
            e.g. ResNet layer3), since pretext tasks over-specialize the last one (mmselfsup:
            relative location probes at 40.4% from res5, 51.2% from res4). Fine-tuning reads the last.
        stage: the name ``depth`` had before selfsup 0.2, still read (``features: {stage: -2}``).
    """

    checkpoint: str | None = None
    input_norm: InputNorm = "channel"
    depth: int = -1
    stage: int | None = None

    def __post_init__(self) -> None:
        if self.stage is not None:
            if self.depth not in (-1, self.stage):
                raise SelfsupError(
                    f"features.stage is the old name of features.depth: give one of them, not both "
                    f"({self.stage} and {self.depth})"
                )
            object.__setattr__(self, "depth", self.stage)
            object.__setattr__(self, "stage", None)


def transfer_backbone(backbone: BackboneSpec | dict | None, features: Features) -> AnyBackbone:
    """The backbone of a transfer stage, with the ``backbone.*`` weights of ``features.checkpoint``
    loaded strictly (None: the backbone's own starting weights, else its random initialization)."""
    spec = BackboneSpec.of(backbone)
    if not features.checkpoint:
        return spec.build()
    model = spec.random().build()
    load_backbone(model, features.checkpoint)
    return model


class _ClassCount(Protocol):
    num_classes: int | None


class TrainsOnLabels(Protocol):
    """A transfer stage whose hyperparameters name its class count (LinearProbe, FineTune, KNNEvaluation)."""

    @property
    def hp(self) -> _ClassCount: ...


def require_labels(module: TrainsOnLabels, dm: object) -> None:
    """Stop before training when the data have no labels to train on, or the module was built
    without a class count (``hparams.num_classes``; one line, the fix)."""
    if isinstance(dm, ImageDataModule) and not dm.has_labels:
        raise SelfsupError(
            f"{type(module).__name__} trains on labels, but the images of {dm.hp.root} have none "
            f"(data.labels={dm.hp.labels}); point --data.root at labeled images (ROOT/<class>/<image>), "
            "or set --data.labels folders if its folders are the classes"
        )
    if module.hp.num_classes is None:
        raise SelfsupError(
            f"{type(module).__name__} was built without num_classes: selfsup fit links it from "
            "the data; in Python pass num_classes=dm.num_classes"
        )


def training_view(images: torch.Tensor, input_norm: InputNorm, crop_min_scale: float | None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the float input of a training step: :func:`preprocess`, then with
    ``crop_min_scale`` a random resized crop (scale ``crop_min_scale``..1, same size) flipped
    half the time, drawn on the device."""
    x = preprocess(images, input_norm)
    if crop_min_scale is not None:
        x = random_resized_crop(x, x.shape[-1], scale=(crop_min_scale, 1.0))
    return x


def frozen_features(
    backbone: nn.Module, images: torch.Tensor, features: Features, crop_min_scale: float | None = None
) -> torch.Tensor:
    """Pooled features (B, F) at ``features.depth`` of uint8 images (B, 3, H, W) through a frozen
    backbone, normalized as it saw its inputs in pretraining (:func:`training_view`)."""
    # Lightning restores each submodule's recorded train/eval flag around validation, bypassing
    # a module's train(); re-assert eval here so BatchNorm statistics never move.
    if backbone.training:
        backbone.eval()
    return backbone(training_view(images, features.input_norm, crop_min_scale), depth=features.depth)


@torch.no_grad()
def embed_all(
    embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device, batch_size: int = 512
) -> torch.Tensor:
    """Features of uint8 images (N, 3, H, W) in batches on ``device``: float (N, F). Streamed
    images (``LazyImages``) are decoded batch by batch in their loader's workers."""
    if isinstance(images, LazyRows):
        return torch.cat([embed(b.to(device)).float() for b in images.batches(batch_size)])
    return torch.cat([embed(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)])


def _rows(images: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi of a tensor, or of streamed images without decoding them (indexed like a tensor)."""
    return cast(torch.Tensor, images.rows(lo, hi)) if isinstance(images, LazyRows) else images[lo:hi]


@torch.no_grad()
def embed_all_ranks(
    trainer: L.Trainer, embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """:func:`embed_all` shared out over the job's ranks: each computes an equal share of the rows
    and every rank gets all of them, (N, F) in row order: one pass over the images for the whole
    job, not one per rank. A collective call under DDP: every rank calls it."""
    # At the run's precision (bf16 autocast under bf16-mixed), as its own forward passes are:
    # these passes happen outside training_step, where Lightning would not set it.
    with trainer.precision_plugin.forward_context():
        return _embed_share(trainer, embed, images, device)


def _embed_share(
    trainer: L.Trainer, embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    world, rank = trainer.world_size, trainer.global_rank
    if world == 1:
        return embed_all(embed, images, device)
    n = len(images)
    share = -(-n // world)
    lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
    # A rank past the end embeds one image only to learn the feature width.
    mine = embed_all(embed, _rows(images, lo, hi) if hi > lo else _rows(images, 0, 1), device)[: hi - lo]
    padded = mine.new_zeros(share, mine.shape[1])
    padded[: len(mine)] = mine
    # torch.distributed's all_gather (Lightning's strategy.all_gather goes through a deprecated API).
    return gather_no_grad(padded)[:n]


class PerImageCorrect:
    """Which evaluation images a stage classified right, by row of the evaluation split: what the
    pipeline's verdict compares backbones on, image by image (a paired test needs the same images).

    Each validation pass overwrites the rows it sees, so the record is the last pass's."""

    def __init__(self) -> None:
        self._by_row: dict[int, bool] = {}

    def update(self, rows: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """``rows``, ``predicted`` and ``labels``: (B,) integers of one validation batch."""
        ok = (predicted.detach() == labels.detach()).cpu().tolist()
        self._by_row.update(zip(rows.detach().cpu().tolist(), ok, strict=True))

    def result(self) -> torch.Tensor:
        """bool (N,) in row order, over every rank's rows (a collective call under DDP: every rank
        calls it; DistributedSampler's padding repeats rows, which agree)."""
        by_row = dict(self._by_row)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[dict[int, bool] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, by_row)
            for part in parts:
                by_row.update(part or {})
        if sorted(by_row) != list(range(len(by_row))):
            raise SelfsupError(
                f"per-image results cover {len(by_row)} rows, not every row from 0: validate on a whole split"
            )
        return torch.tensor([by_row[i] for i in range(len(by_row))], dtype=torch.bool)
