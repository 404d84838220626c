"""Losses in plain torch, one per file."""

from selfsup.losses.byol import byol_loss, normalized_mse
from selfsup.losses.infonce import info_nce
from selfsup.losses.ntxent import NTXentLoss
from selfsup.losses.vicreg import VICRegLoss

__all__ = ["NTXentLoss", "VICRegLoss", "byol_loss", "info_nce", "normalized_mse"]
