"""Typed reads of what Lightning attaches to a ``Trainer`` from outside the class.

``trainer.datamodule`` and ``trainer.callbacks`` are set by Lightning's connectors
(``DataConnector``, ``CallbackConnector``), so the ``Trainer`` class never declares them and a
type checker cannot see them; these accessors read them with their actual types.
"""

from __future__ import annotations

import lightning as L


def datamodule_of(trainer: L.Trainer) -> L.LightningDataModule | None:
    """The DataModule the trainer runs with (None: loaders were passed directly)."""
    # Set by Lightning's DataConnector when a fit, validate or test begins: absent before.
    dm: L.LightningDataModule | None = getattr(trainer, "datamodule", None)
    return dm


def callbacks_of(trainer: L.Trainer) -> list[L.Callback]:
    """Every callback of the trainer, the module's ``configure_callbacks`` included."""
    return trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector
