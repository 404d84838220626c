"""Data as it flows: ``folders`` (scan, labels) -> ``splits`` -> ``cache`` (decoded once per job)
or ``litdata`` (streamed) -> ``datamodule`` (``ImageDataModule``) -> on the device ``crops``,
``views`` and ``patches``.

Every module here but ``datamodule`` is plain torch, Pillow and numpy: decoding workers and
the views import no Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ImageDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ImageDataModule":
        # `from selfsup.data import ImageDataModule` keeps working without making every
        # plain-torch module of this package import Lightning.
        from selfsup.data.datamodule import ImageDataModule

        return ImageDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
