"""The stages, one LightningModule each."""

from selfsup.methods.knn import KNNEvaluation
from selfsup.methods.moco import MoCo
from selfsup.methods.relative_location import RelativeLocation
from selfsup.methods.simclr import SimCLR
from selfsup.methods.transfer import FineTune, LinearProbe

__all__ = ["FineTune", "KNNEvaluation", "LinearProbe", "MoCo", "RelativeLocation", "SimCLR"]
