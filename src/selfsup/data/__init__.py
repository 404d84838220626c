"""Data: sources decoded to uint8 tensors, the DataModule, patch grids and batched views.

``ImageDataModule`` is imported on first use, so that the plain-torch parts (and the decoding
worker processes, which import ``selfsup.data.decode``) do not pull in Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ImageDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ImageDataModule":
        from selfsup.data.datamodule import ImageDataModule

        return ImageDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
