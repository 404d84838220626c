"""Learning-rate scaling and warmup through the real Trainer on real images (one process).

The 2-process DDP checks are in test_ddp.py; the simulated SLURM job in test_cluster.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from selfsup import SelfsupError
from selfsup.callbacks import LearningRateScaling, Warmup
from selfsup.cli import main
from selfsup.data import ImageDataModule
from selfsup.methods import FineTune, LinearProbe
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.optim.schedules import lr_factor, scale_lr

REPO = Path(__file__).resolve().parents[2]


def test_scale_lr_rules() -> None:
    assert scale_lr(0.1, 512, 256, "linear") == pytest.approx(0.2)
    assert scale_lr(0.1, 8192, 256, "linear") == pytest.approx(3.2)  # Goyal et al.: 0.1 x 8k/256
    assert scale_lr(0.3, 4096, 256, "sqrt") == pytest.approx(1.2)
    assert scale_lr(0.3, 64, 256, "sqrt") == pytest.approx(0.15)
    assert scale_lr(0.3, 4096, 256, "none") == 0.3
    assert scale_lr(0.5, 1, 256) == pytest.approx(0.5 / 256)  # batch 1 is legal
    with pytest.raises(ValueError, match="positive"):
        scale_lr(0.1, 0)
    with pytest.raises(ValueError, match="unknown lr scaling rule"):
        scale_lr(0.1, 256, 256, "cubic")  # type: ignore[arg-type]


def test_lr_factor_schedule_points() -> None:
    total, warm = 100, 10
    assert lr_factor(0, total, warm) == 0.0  # warmup starts from 0
    assert lr_factor(5, total, warm) == pytest.approx(0.5)
    assert lr_factor(warm, total, warm) == pytest.approx(1.0)  # end of warmup: the target
    assert lr_factor(55, total, warm) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(99, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(100, total, warm) == pytest.approx(0.0)
    assert lr_factor(55, total, warm, "constant") == 1.0
    assert lr_factor(3, math.inf, warm) == pytest.approx(0.3)  # no known end: constant after warmup
    assert lr_factor(30, math.inf, warm) == 1.0
    assert lr_factor(0, total, 0) == 1.0  # no warmup: the first step at the target


class RecordLR(L.Callback):
    """The rate each optimizer step actually used, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


class StopAfter(L.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _probe() -> LinearProbe:
    L.seed_everything(0)
    return LinearProbe(
        num_classes=3, backbone={"name": "small_cnn", "width": 4}, optimizer=OptimizerSpec("sgd", lr=0.4)
    )


def _fit(
    model: L.LightningModule,
    dm: ImageDataModule,
    root: Path,
    callbacks: list[L.Callback],
    max_epochs: int,
    ckpt_path: str | None = None,
    **kw,
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=callbacks,
        **kw,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_schedule_through_the_trainer_and_across_a_resume(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 120 images, batch 8: 15 optimizer steps per epoch, 4 epochs = 60 steps, 1 warmup epoch.
    dm = ImageDataModule(root=str(image_folder), batch_size=8)
    spe, total, warm = 15, 60, 15
    target = 0.4 * 8 / 32  # linear rule against a reference batch of 32

    def callbacks(*extra: L.Callback) -> list[L.Callback]:
        return [LearningRateScaling("linear", reference_batch=32), Warmup(warmup_epochs=1), *extra]

    full = RecordLR()
    _fit(_probe(), dm, tmp_path / "full", callbacks(full), 4)
    assert (
        capsys.readouterr().out.count("lr scaling: base_lr=0.4 global_batch=8 reference=32 rule=linear -> lr=0.1\n")
        == 1
    )
    assert sorted(full.lrs) == list(range(total))
    assert full.lrs[0] == 0.0
    assert full.lrs[7] == pytest.approx(target * 7 / warm)
    assert full.lrs[warm] == pytest.approx(target)  # end of warmup
    mid = (warm + total) // 2
    assert full.lrs[mid] == pytest.approx(target * 0.5 * (1 + math.cos(math.pi * (mid - warm) / (total - warm))))
    assert full.lrs[total - 1] == pytest.approx(
        target * 0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm)))
    )
    assert 0 < full.lrs[total - 1] < 0.01 * target

    # Stop after 2 of 4 epochs, checkpoint, resume in a fresh Trainer: the same curve, scaled once.
    first = RecordLR()
    ckdir = tmp_path / "ck"
    _fit(
        _probe(), dm, tmp_path / "a", callbacks(first, StopAfter(2), ModelCheckpoint(dirpath=ckdir, filename="mid")), 4
    )
    assert sorted(first.lrs) == list(range(2 * spe))
    saved = torch.load(ckdir / "mid.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 * spe
    second = RecordLR()
    _fit(_probe(), dm, tmp_path / "b", callbacks(second), 4, ckpt_path=str(ckdir / "mid.ckpt"))
    assert sorted(second.lrs) == list(range(2 * spe, total))
    for step, lr in {**first.lrs, **second.lrs}.items():
        assert lr == pytest.approx(full.lrs[step], rel=1e-12, abs=1e-15), step


def test_accumulation_counts_in_the_global_batch_and_gives_the_same_step(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Batch 32 x accumulate 2 and batch 64: the same global batch, the same scaled rate and,
    with GroupNorm (no batch statistics), the same weights after one optimizer step."""
    weights, lines = [], []
    for batch, accumulate in ((64, 1), (32, 2)):
        L.seed_everything(0)
        model = FineTune(
            num_classes=3,
            backbone={"name": "small_cnn", "width": 8, "norm": "group"},
            augment=False,
            optimizer=OptimizerSpec("sgd", lr=0.5, weight_decay=1e-4),
        )
        start = [p.detach().clone() for p in model.parameters()]
        dm = ImageDataModule(root=str(image_folder), batch_size=batch)
        scaling = LearningRateScaling("linear", reference_batch=256)
        _fit(
            model,
            dm,
            tmp_path / f"b{batch}",
            [scaling, Warmup(warmup_steps=0)],
            1,
            max_steps=1,
            accumulate_grad_batches=accumulate,
        )
        assert scaling.global_batch == 64
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
        weights.append([p.detach().clone() for p in model.parameters()])
    assert lines[0] == lines[1] == "lr scaling: base_lr=0.5 global_batch=64 reference=256 rule=linear -> lr=0.125"
    moved = max(float((w - s).abs().max()) for w, s in zip(weights[0], start, strict=True))
    assert moved > 1e-3  # the step did something
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batch_size_one_and_full_batch(image_folder: Path, tmp_path: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=1)
    L.seed_everything(0)
    model = FineTune(
        num_classes=3,
        backbone={"name": "small_cnn", "width": 8, "norm": "group"},
        optimizer=OptimizerSpec("sgd", lr=0.01),
    )
    rec = RecordLR()
    scaling = LearningRateScaling()
    _fit(model, dm, tmp_path / "sgd", [scaling, Warmup(), rec], 1, max_steps=5)
    assert scaling.global_batch == 1 and len(rec.lrs) == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())

    dm = ImageDataModule(root=str(image_folder), batch_size=120)  # every training image in one batch
    L.seed_everything(0)
    model = FineTune(num_classes=3, backbone={"name": "small_cnn", "width": 8}, optimizer=OptimizerSpec("sgd", lr=0.1))
    rec = RecordLR()
    scaling = LearningRateScaling()
    trainer = _fit(model, dm, tmp_path / "gd", [scaling, Warmup(decay="constant"), rec], 3)
    assert trainer.num_training_batches == 1 and scaling.global_batch == 120
    assert sorted(rec.lrs) == [0, 1, 2]  # one step per epoch: full-batch gradient descent


def test_batch_norm_at_batch_one_fails_clearly(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(REPO / "configs/trainer/cpu.yaml"),
        "--config",
        str(REPO / "configs/finetune/cifar10.yaml"),
        "--model.init_args.backbone.name",
        "small_cnn",
        "--model.init_args.backbone.width",
        "8",
        "--data.root",
        str(image_folder),
        "--data.batch_size",
        "1",
        "--trainer.max_steps",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    with pytest.raises(SystemExit) as e:
        main([*args, "--trainer.default_root_dir", str(tmp_path / "bn")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the decoding progress bar
    assert err.startswith("selfsup: error: BatchNorm cannot train on a batch of 1")
    assert "GroupNorm" in err and "--model.init_args.backbone.norm group" in err
    # The suggested fix runs.
    main([*args, "--model.init_args.backbone.norm", "group", "--trainer.default_root_dir", str(tmp_path / "gn")])
    assert "global_batch=1 " in capsys.readouterr().out


def test_warmup_arguments_are_checked() -> None:
    with pytest.raises(SelfsupError, match=r"warmup.warmup_epochs must be at least 0, got -1"):
        Warmup(warmup_epochs=-1)
    with pytest.raises(SelfsupError, match="reference_batch"):
        LearningRateScaling(reference_batch=0)
