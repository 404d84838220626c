"""Data: sources decoded to uint8 tensors, the DataModule, patch grids and batched views."""

from selfsup.data.datamodule import ImageDataModule

__all__ = ["ImageDataModule"]
