"""The contracts between the parts: what a stage module offers the DataModule, the run layer, the
pipeline and the evaluators, and what a split's images offer the passes that read them.

A new pretraining method provides :class:`PretrainingMethod`'s members (``tests/unit/
test_protocols.py`` checks every registered method against it); the optional ones below are
looked for with ``isinstance`` (each protocol is ``runtime_checkable``), never with ``hasattr``.
Plain typing: importing this module imports no Lightning.

Each stage module implements these hooks, and Lightning's (``setup``, ``check_data``, the
``*_step`` methods, the typed ``hp`` property), in its own file, so that one method's whole loop
reads in one place: two modules' hook bodies may read alike, and are the one kind of repeated
block the code allows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

#: What a loader worker makes of a stored sample (``selfsup.data.litdata.samples``).
SampleFn = Callable[[dict[str, Any]], dict[str, Any]]


@runtime_checkable
class Embeds(Protocol):
    """Backbone features of plain images: uint8 (B, 3, H, W) on the module's device -> (B, F).
    The online evaluator's kNN bank and frozen classifier read them."""

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class StreamsSamples(Protocol):
    """What a streamed dataset's workers should make of each training image for this module
    (two crops of the full image for SimCLR, a random square for relative location, ...);
    without it the workers cut the center square."""

    def stream_sample(self, image_size: int) -> SampleFn: ...


@runtime_checkable
class ChecksData(Protocol):
    """A check of the data before anything trains (labels present, images large enough for a
    patch grid), raising a one-line ``SelfsupError``; ``selfsup fit`` and the pipeline call it."""

    def check_data(self, dm: Any) -> None: ...


@runtime_checkable
class ProbeInputNorm(Protocol):
    """How an evaluation should normalize the inputs of this method's backbone: ``channel``
    (ImageNet statistics) or ``per_image`` (as relative location saw its patches)."""

    @property
    def probe_input_norm(self) -> str: ...


@runtime_checkable
class HasViews(Protocol):
    """A two-view method's views (``selfsup.data.views.SimCLRViews``): called on uint8 images
    with a generator, they give two batches of views; drawn by ``selfsup.media.ViewsFigure``."""

    views: torch.nn.Module


@runtime_checkable
class Reconstructs(Protocol):
    """A masked-image model (MAE): uint8 images (B, 3, H, W) -> the images with their hidden
    patches gray and the restored images, both uint8 (B, 3, H, W); drawn by
    ``selfsup.media.ReconstructionFigure``."""

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class HasOnline(Embeds, Protocol):
    """A pretraining method that carries the online evaluator (``selfsup.evaluation.online``)
    and returns ``OnlineHooks`` from ``configure_callbacks``."""

    online: torch.nn.Module


@runtime_checkable
class HasClassifier(Protocol):
    """An evaluation stage with a classification head and its confusion matrix
    (``selfsup.evaluation.linear.Classifier``; None before the class count is known)."""

    classifier: torch.nn.Module | None


@runtime_checkable
class PretrainingMethod(Embeds, StreamsSamples, ProbeInputNorm, Protocol):
    """Everything a pretraining method offers: features for the evaluators, its streamed
    samples, its probes' input normalization, and the ``backbone`` the next stage and
    ``selfsup export`` take (keys under ``backbone.`` in its checkpoints). A data check
    (:class:`ChecksData`) is optional."""

    backbone: torch.nn.Module


@runtime_checkable
class RecordsCorrect(Protocol):
    """An evaluation stage that records which evaluation images it classified right (linear
    probe, fine-tuning, kNN): the pipeline's verdict compares backbones on them image by image."""

    def per_image_correct(self) -> torch.Tensor:
        """bool (N,), by row of the evaluation split, of the last validation (a collective call under DDP)."""
        ...


@runtime_checkable
class LazyRows(Protocol):
    """Images of a split that are decoded when read (a streamed split's ``LazyImages``): indexed
    like a uint8 (N, 3, S, S) tensor, and besides that read by rows or in order."""

    @property
    def streams_whole_split(self) -> bool: ...

    def rows(self, lo: int, hi: int) -> LazyRows: ...

    def subset(self, idx: torch.Tensor) -> LazyRows: ...

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]: ...


class StageHparams(Protocol):
    """What every stage module keeps in its hyperparameters (``save_plain_hyperparameters``: the
    typed groups as plain dicts); each module extends it with its own arguments and reads them
    through a typed ``hp`` property (Lightning types ``hparams`` as a plain mapping)."""

    backbone: dict[str, Any]
    optimizer: dict[str, Any]


class TransferHparams(StageHparams, Protocol):
    """An evaluation stage's: the class count (linked from the data) and the features it reads."""

    num_classes: int | None
    features: dict[str, Any]


class TwoViewHparams(StageHparams, Protocol):
    """A contrastive two-view method's (SimCLR, MoCo): projection head, temperature, views, online
    evaluator."""

    proj_hidden: int
    proj_dim: int
    temperature: float
    views: dict[str, Any]
    online: dict[str, Any]
    num_classes: int | None


class DistillHparams(StageHparams, Protocol):
    """Distillation's (``selfsup.methods.Distill``): the frozen teacher, the projection head, mixup,
    gradient clipping, views and online evaluator."""

    teacher: dict[str, Any]
    proj_hidden: int | None
    mixup: bool
    grad_clip: float | None
    views: dict[str, Any]
    online: dict[str, Any]
    num_classes: int | None
