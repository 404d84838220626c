"""Losses in plain torch, one per file."""

from selfsup.losses.byol import byol_loss, normalized_mse
from selfsup.losses.dino import DINOLoss
from selfsup.losses.infonce import info_nce
from selfsup.losses.mae import mae_loss, patchify, random_masking, unpatchify
from selfsup.losses.ntxent import NTXentLoss
from selfsup.losses.vicreg import VICRegLoss

__all__ = [
    "DINOLoss",
    "NTXentLoss",
    "VICRegLoss",
    "byol_loss",
    "info_nce",
    "mae_loss",
    "normalized_mse",
    "patchify",
    "random_masking",
    "unpatchify",
]
