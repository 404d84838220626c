"""selfsup: self-supervised pretraining for images on PyTorch Lightning.

Stages: relative patch location (Doersch et al. 2015), SimCLR (Chen et al. 2020),
and transfer (linear probe, fine-tuning). See README.md for the quick start.
"""

__version__ = "0.2.0"


class SelfsupError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""
