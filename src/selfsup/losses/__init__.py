"""Losses in plain torch, one per file."""

from selfsup.losses.infonce import info_nce
from selfsup.losses.ntxent import NTXentLoss

__all__ = ["NTXentLoss", "info_nce"]
