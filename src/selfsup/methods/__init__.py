"""Pretraining methods, one LightningModule each holding its whole loop; what every method
offers the rest of selfsup is written down in ``selfsup.protocols``."""

from selfsup.evaluation import FineTune, KNNEvaluation, LinearProbe
from selfsup.methods.byol import BYOL
from selfsup.methods.dino import DINO
from selfsup.methods.distill import Distill
from selfsup.methods.mae import MAE
from selfsup.methods.moco import MoCo
from selfsup.methods.relative_location import RelativeLocation
from selfsup.methods.simclr import SimCLR
from selfsup.methods.vicreg import VICReg

#: Pretraining methods by the names the pipeline and the usage text show.
PRETRAINING = {
    "relative_location": RelativeLocation,
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "vicreg": VICReg,
    "dino": DINO,
    "mae": MAE,
    "distill": Distill,
}

# FineTune, KNNEvaluation and LinearProbe live in selfsup.evaluation; configs written before
# 0.2 name them here (class_path: selfsup.methods.LinearProbe), so the old paths keep working.
__all__ = [
    "BYOL",
    "DINO",
    "MAE",
    "PRETRAINING",
    "Distill",
    "FineTune",
    "KNNEvaluation",
    "LinearProbe",
    "MoCo",
    "RelativeLocation",
    "SimCLR",
    "VICReg",
]
