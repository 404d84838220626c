"""The linear probe's rate and weight decay, chosen on held-out training images only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from torchvision.io import read_image

from selfsup import SelfsupError
from selfsup.callbacks.lr import LearningRateScaling, Warmup
from selfsup.data import ImageDataModule
from selfsup.data.splits import stratified_holdout
from selfsup.evaluation.features import preprocess
from selfsup.evaluation.linear import linear_head, search_epochs
from selfsup.evaluation.probe_search import ProbeSearch, search_probe
from selfsup.methods import LinearProbe
from selfsup.optim.optimizer import OptimizerSpec

TINY = {"backbone": {"name": "small_cnn", "width": 8}}
SEARCH = ProbeSearch(lrs=(1e-4, 3e-3, 3e-2), weight_decays=(0.0, 1e-3))


def fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha1(x.detach().contiguous().numpy().tobytes()).hexdigest()


class RecordInputs(L.Callback):
    """Every input of the probe's backbone before training starts, i.e. during the search."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.handle = pl_module.backbone.register_forward_pre_hook(lambda m, inp: self.seen.append(inp[0].clone()))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.handle.remove()  # configure_optimizers, where the search runs, has returned


def fit_probe(tmp_path: Path, dm: ImageDataModule, *callbacks: L.Callback, epochs: int = 2) -> LinearProbe:
    L.seed_everything(0, verbose=False)  # the same random backbone each time
    probe = LinearProbe(num_classes=3, search=SEARCH, **TINY)
    t = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        callbacks=[LearningRateScaling("sqrt", 256), Warmup(decay="cosine"), *callbacks],
    )
    t.fit(probe, datamodule=dm)
    return probe


def test_search_never_sees_the_evaluation_split(tmp_path: Path, image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    rec = RecordInputs()
    probe = fit_probe(tmp_path, dm, rec)
    assert probe.chosen is not None and len(probe.chosen.table) == 6
    seen = torch.cat(rec.seen)
    train = preprocess(dm.train_set.images, "channel")
    evaluation = preprocess(dm.eval_set.images, "channel")
    # The backbone saw each training image once, and no evaluation image at all.
    assert sorted(fingerprint(x) for x in seen) == sorted(fingerprint(x) for x in train)
    assert not {fingerprint(x) for x in seen} & {fingerprint(x) for x in evaluation}
    assert probe.chosen.fit_images + probe.chosen.holdout_images == len(dm.train_set)
    # The probe trains with what was chosen, and the cache the search filled serves its epochs.
    lrs = {g["weight_decay"] for g in probe.trainer.optimizers[0].param_groups}
    assert probe.chosen.weight_decay in lrs
    assert bool(probe._cache["train"][1].all())

    # Other evaluation images and labels change nothing in the search.
    dm2 = ImageDataModule(root=str(image_folder), batch_size=16)
    dm2.setup("fit")
    g = torch.Generator().manual_seed(1)
    dm2.eval_set.images = torch.randint(0, 256, dm2.eval_set.images.shape, dtype=torch.uint8, generator=g)
    dm2.eval_set.labels = dm2.eval_set.labels[torch.randperm(len(dm2.eval_set.labels), generator=g)]
    again = fit_probe(tmp_path / "again", dm2)
    assert again.chosen.table == probe.chosen.table


def test_search_picks_the_setting_that_generalizes() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(400) % 4
    features = centers[labels] + torch.randn(400, 16, generator=g)
    result = search_probe(
        features,
        labels,
        lambda: linear_head(16, 4, "batch"),
        ProbeSearch(lrs=(1e-7, 1e-2), weight_decays=(0.0,)),
        OptimizerSpec(name="adam"),
        epochs=5,
        batch_size=32,
        lr_at=lambda base, step, total: base,
    )
    # A rate of 1e-7 leaves the head where it started; 1e-2 separates the four clusters.
    assert result.lr == 1e-2 and result.holdout_top1 > 0.9
    assert [r["lr"] for r in result.table] == [1e-7, 1e-2] and result.table[0]["holdout_top1"] < 0.6
    assert (result.fit_images, result.holdout_images) == (360, 40)
    assert "it is the largest rate tried" in result.describe()  # a hint to search further


def test_holdout_is_class_balanced_seeded_and_disjoint() -> None:
    labels = torch.arange(300) % 3
    fit, held = stratified_holdout(labels, 0.1, seed=5)
    assert torch.bincount(labels[held]).tolist() == [10, 10, 10]
    assert not set(fit.tolist()) & set(held.tolist()) and len(fit) + len(held) == 300
    assert torch.equal(held, stratified_holdout(labels, 0.1, seed=5)[1])
    assert not torch.equal(held, stratified_holdout(labels, 0.1, seed=6)[1])
    with pytest.raises(SelfsupError, match="holdout"):
        stratified_holdout(labels, 1.0, seed=0)


def test_search_is_drawn_and_kept(tmp_path: Path, image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    probe = LinearProbe(num_classes=3, search=ProbeSearch(lrs=(1e-3, 1e-2)), **TINY)
    t = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    t.fit(probe, datamodule=dm)
    picture = read_image(str(tmp_path / "search_holdout.png"))
    assert picture.shape[0] == 3 and picture.shape[2] > 100
    metrics = t.validate(probe, datamodule=dm, verbose=False)[0]
    assert metrics["search/lr"] == pytest.approx(probe.chosen.lr)  # logged as float32
    t.save_checkpoint(tmp_path / "probe.ckpt")
    kept = torch.load(tmp_path / "probe.ckpt", weights_only=True)["probe_search"]
    assert kept["lr"] == probe.chosen.lr and len(kept["table"]) == 2


def test_classic_probe_augments_and_cannot_cache(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(SelfsupError, match="cache_features: false"):
        LinearProbe(num_classes=3, augment=True, **TINY)
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    probe = LinearProbe(num_classes=3, augment=True, cache_features=False, **TINY)
    rec = []
    probe.backbone.register_forward_pre_hook(lambda m, inp: rec.append(inp[0].clone()))
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(probe, datamodule=dm)
    # Crops of the training images, not the images themselves.
    train = {fingerprint(x) for x in preprocess(dm.train_set.images, "channel")}
    assert rec and not {fingerprint(x) for x in torch.cat(rec)} & train


def test_search_follows_a_step_budget(tmp_path: Path, image_folder: Path) -> None:
    """max_steps without max_epochs: the search trains its heads for as many epochs as the probe
    will (14 steps of 16 over 120 images: 2 epochs of 7 batches)."""
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    probe = LinearProbe(num_classes=3, search=ProbeSearch(lrs=(1e-3, 1e-2)), **TINY)
    t = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=14,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[Warmup(decay="cosine")],
    )
    assert search_epochs(t, 120, 16) == 2
    t.fit(probe, datamodule=dm)
    assert probe.chosen is not None and t.global_step == 14
