"""Keep a normal run's output to what a user acts on: no advertising tips, no deprecation notices
about code the user does not own, no warnings about what a resumed run does on purpose."""

from __future__ import annotations

import logging
import os
import warnings

#: Lightning's info lines that advertise products, name hardware this machine lacks, or report
#: what selfsup does on purpose.
_DROPPED_INFO = (
    "💡 Tip",
    "TPU available",
    "HPU available",
    # a module's own callbacks (figures, online evaluation) attached again for validate
    "will override existing callbacks passed to Trainer",
)

#: Warnings (regular expressions) that a selfsup run triggers by design or that concern
#: libraries' internals, not the user's config.
_IGNORED_WARNINGS = (
    r".*LeafSpec.*is deprecated.*",  # Lightning's pytree helper against newer torch
    r".*instantiate_classes.*deprecated.*",  # jsonargparse, called by LightningCLI
    r"Experiment logs directory .* exists and is not empty.*",  # a resumed run appends its metrics
    r"Checkpoint directory .* exists and is not empty.*",  # a resumed run replaces last.ckpt
    r".*`weights_only` was not set.*",
    # LitData shards a streamed split over ranks and workers itself, so its length is right
    r"Your `IterableDataset` has `__len__` defined.*",
    # Distillation's teacher is frozen in eval mode on purpose
    r"Found \d+ module\(s\) in eval mode at the start of training.*",
    # The pipeline validates each stage after fitting it, on the sampler fit's own validation
    # uses; the verdict's per-image results count each image once (PerImageCorrect).
    r"Using `DistributedSampler` with the dataloaders\. During `trainer\.validate\(\)`.*",
)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in record.getMessage() for part in _DROPPED_INFO)


def quiet_lightning() -> None:
    """Install the filters (idempotent); W&B keeps its per-run banners and metric summaries to
    itself unless ``WANDB_SILENT`` says otherwise (the files are in the run folder)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropInfo) for f in logger.filters):
            logger.addFilter(_DropInfo())
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
