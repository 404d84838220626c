"""Losses in plain torch."""

from selfsup.losses.ntxent import NTXentLoss

__all__ = ["NTXentLoss"]
