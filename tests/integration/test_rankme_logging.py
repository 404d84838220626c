"""RankMe logged by the pretraining modules every epoch, on fixed images, and CollapseWatch's
warning when it falls to one dimension."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from selfsup.callbacks.guards import CollapseWatch
from selfsup.data import ImageDataModule
from selfsup.evaluation.online import RankMeMonitor, rankme_images
from selfsup.methods import RelativeLocation, SimCLR
from selfsup.metrics import rankme

TINY = {"backbone": {"name": "small_cnn", "width": 8}}


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def _collapse_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "rankme" in str(w.message) and "collapsed" in str(w.message)]


class ExpectedRank(L.Callback):
    """At each epoch's end, RankMe of the backbone's features of the whole validation split (30
    images: all of them are the fixed set), computed here in eval mode, apart from the monitor."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.values = images, []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SimCLR)
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        with torch.no_grad():
            self.values.append(rankme(pl_module.embed(self.images)))
        for m, training in modes:
            m.training = training


def test_simclr_logs_rankme_of_fixed_images_every_epoch(image_folder: Path, tmp_path: Path) -> None:
    # Unlabeled images: the online evaluator has nothing to evaluate, RankMe needs no labels.
    dm = ImageDataModule(root=str(image_folder), batch_size=16, labels="none")
    L.seed_everything(0)
    model = SimCLR(**TINY, proj_hidden=16, proj_dim=8)
    val_images = dm.splits()[1].images
    split, fixed = rankme_images(dm)
    assert split == "val" and torch.equal(fixed, val_images)  # fewer than 1024: all of them, in order
    expected, watch = ExpectedRank(val_images), CollapseWatch()
    t = _trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=3,
        num_sanity_val_steps=0,
        logger=CSVLogger(str(tmp_path), name="", version=""),
        callbacks=[expected, watch],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, datamodule=dm)

    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/rankme")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # once per epoch
    logged = [float(r["val/rankme"]) for r in rows]
    n, d = len(val_images), model.backbone.num_features
    for value in logged:
        assert math.isfinite(value) and 1.0 <= value <= min(n, d) + 1e-4
    # The value of each epoch's model on the fixed images (logged as float32).
    assert logged == [float(torch.tensor(v, dtype=torch.float32)) for v in expected.values]
    assert logged[0] != logged[1]  # the model trained in between: a fresh measure, not a repeat
    assert float(t.callback_metrics["val/rankme"]) == logged[-1]
    # A healthy run spans several dimensions: no collapse warning.
    assert min(logged) > watch.rank_threshold and not _collapse_warnings(caught) and not watch.warned_rank


def test_relative_location_logs_rankme_in_fit_and_validate(image_folder: Path, tmp_path: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    model = RelativeLocation(**TINY, head_hidden=16)
    t = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    t.fit(model, datamodule=dm)
    assert 1.0 <= float(t.callback_metrics["val/rankme"]) <= 30 + 1e-4
    out = t.validate(model, datamodule=dm, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        z = model.embed(dm.splits()[1].images)
    assert out["val/rankme"] == float(torch.tensor(rankme(z), dtype=torch.float32))


class ConstantFeatures(L.LightningModule):
    """A pretraining module whose backbone embeds every image as the same vector (its weights are
    zero and frozen, its bias trains): a collapsed representation."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 16, 3)
        nn.init.zeros_(conv.weight)
        nn.init.constant_(conv.bias, 0.5)
        conv.weight.requires_grad_(False)
        self.backbone = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images.float() / 255)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.embed(batch["image"]) - 1).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def configure_callbacks(self) -> list[L.Callback]:
        return [RankMeMonitor()]


def test_collapse_watch_warns_once_when_rankme_falls_to_one(image_folder: Path, tmp_path: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=16, labels="none")
    watch = CollapseWatch()
    t = _trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=[watch])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(ConstantFeatures(), datamodule=dm)
    assert float(t.callback_metrics["val/rankme"]) < 1.001
    said = _collapse_warnings(caught)
    assert len(said) == 1 and watch.warned_rank and not watch.warned  # once; the spread was never logged
    assert "after 1 epoch:" in said[0] and "span about 1 dimension " in said[0]
    assert "lower optimizer.lr" in said[0] and "no negatives" in said[0]
