"""Distillation from a frozen teacher with a real Trainer on real images: the student comes to the
teacher, the teacher never changes, the checkpoint holds the student, probes and the CLI read it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import read_image

from selfsup.cli import main
from selfsup.data import ImageDataModule
from selfsup.data.views import normalize, to_float
from selfsup.evaluation.features import Features
from selfsup.methods import Distill, LinearProbe
from selfsup.models.backbones import BackboneSpec
from selfsup.pipeline import Stage, stage_model

from conftest import REPO
from conftest import cpu_trainer as trainer

#: The student: a small CNN of width 8 (32 features); the teacher twice as wide (64 features).
STUDENT = {"name": "small_cnn", "width": 8}
TEACHER = {"name": "small_cnn", "width": 16}

#: The backbone fields of timm vision transformers, unset for a CNN.
NOT_A_VIT = {"image_size": None, "patch_size": None, "pool": None, "timm_kwargs": None}


@pytest.fixture
def teacher_weights(tmp_path: Path) -> Path:
    """A teacher's weights file as people save one (``torch.save(model.state_dict(), f)``): fixed
    weights and BatchNorm statistics of its own, as a trained network has."""
    torch.manual_seed(1)
    teacher = BackboneSpec.of(TEACHER).build()
    with torch.no_grad():
        teacher.train()(normalize(to_float(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))))
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    return path


def distill(weights: Path, **kw) -> Distill:
    args = {"optimizer": {"name": "adam", "lr": 3e-3}, "num_classes": 3, **kw}
    return Distill(backbone=STUDENT, teacher={**TEACHER, "weights": str(weights)}, **args)


def val_images(image_folder: Path) -> torch.Tensor:
    """The 30 held-out images as one fixed uint8 batch (30, 3, 32, 32)."""
    return torch.stack([read_image(str(p)) for p in sorted(image_folder.glob("val/*/*.jpg"))])


def distance(model: Distill, images: torch.Tensor) -> float:
    """The distillation loss (2 - 2 cos between student projection and teacher features) on fixed views."""
    model.eval()
    with torch.no_grad():
        return float(model.loss(model.views.view(images, torch.Generator().manual_seed(0)))[0])


def test_distillation_brings_the_student_to_the_teacher(
    tmp_path: Path, dm: ImageDataModule, image_folder: Path, teacher_weights: Path
) -> None:
    torch.manual_seed(0)
    model = distill(teacher_weights)
    assert model.projector(torch.zeros(2, 32)).shape == (2, 64)  # student width -> teacher width
    images = val_images(image_folder)
    before = distance(model, images)
    t = trainer(tmp_path, max_epochs=2)
    t.fit(model, datamodule=dm)
    after = distance(model, images)
    assert before > 1.0 and after < 0.25 * before, (before, after)
    # Both spreads logged: the student's projections and the teacher's features it is taught.
    spread, teacher = (float(t.callback_metrics[k]) for k in ("train/embedding_spread_epoch", "train/teacher_spread"))
    assert 0 < spread < 2 and 0.05 < teacher < 2, (spread, teacher)
    assert float(t.callback_metrics["val/loss"]) < 0.25 * before
    assert 0 <= float(t.callback_metrics["val/online_top1"]) <= 1  # the online head trained on mixed images


def test_teacher_stays_frozen_and_out_of_the_checkpoint(
    tmp_path: Path, dm: ImageDataModule, teacher_weights: Path
) -> None:
    model = distill(teacher_weights)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert not any(m.training for m in model.teacher.modules())
    seen: list[tuple[bool, bool]] = []
    model.teacher.register_forward_pre_hook(lambda mod, inp: seen.append((mod.training, torch.is_grad_enabled())))
    # Two epochs of two steps with a validation between them: Lightning switches modes around it.
    t = trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    t.fit(model, datamodule=dm)
    assert t.global_step == 4 and len(seen) >= 4  # the teacher ran in every training and validation step
    assert not any(training or grad for training, grad in seen)
    model.train()  # what Lightning's loops call
    assert model.backbone.training and not any(m.training for m in model.teacher.modules())
    for k, v in model.teacher.state_dict().items():  # weights and BatchNorm statistics, bitwise
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.teacher.parameters()}
    assert {id(p) for p in model.backbone.parameters()} <= in_optimizer
    assert any(not torch.equal(v, student_before[k]) for k, v in model.backbone.state_dict().items())

    ckpt = tmp_path / "distill.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    state = saved["state_dict"]
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    assert backbone.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())  # the student's
    assert not any(k.startswith("teacher.") for k in state)  # the teacher is named by its file
    assert saved["hyper_parameters"]["teacher"] == {
        **TEACHER,
        "cifar_stem": False,
        "norm": "batch",
        "weights": str(teacher_weights),
        **NOT_A_VIT,
    }

    # Loading and resuming build the teacher from its file again.
    again = Distill.load_from_checkpoint(ckpt, weights_only=True)
    assert all(torch.equal(v, before[k]) for k, v in again.teacher.state_dict().items())
    resumed = distill(teacher_weights)
    trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1).fit(
        resumed, datamodule=dm, ckpt_path=str(ckpt)
    )
    assert all(torch.equal(v, before[k]) for k, v in resumed.teacher.state_dict().items())


def test_teacher_runs_at_the_trainer_precision(tmp_path: Path, dm: ImageDataModule, teacher_weights: Path) -> None:
    model = distill(teacher_weights, mixup=False)
    dtypes: list[torch.dtype] = []
    model.teacher.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    trainer(tmp_path, max_steps=1, limit_val_batches=0, precision="bf16-mixed").fit(model, datamodule=dm)
    assert dtypes == [torch.bfloat16]


def test_a_teacher_without_weights_is_named() -> None:
    with pytest.warns(UserWarning, match="teacher .* has no weights"):
        Distill(backbone=STUDENT, teacher=TEACHER)


def test_one_view_per_image_from_the_images_or_the_workers_crops(teacher_weights: Path) -> None:
    model = distill(teacher_weights, views={"size": 24})
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert model.view({"image": images}).shape == (4, 3, 24, 24)
    sample = model.stream_sample(32)  # a streamed dataset's workers cut one crop per image
    assert sample.n == 1 and sample.size == 24 and sample.scale == model.views.scale
    crops = torch.randint(0, 256, (4, 1, 3, 24, 24), dtype=torch.uint8)
    assert model.view({"views": crops}).shape == (4, 3, 24, 24)


def test_linear_probe_reads_the_student(tmp_path: Path, dm: ImageDataModule, teacher_weights: Path) -> None:
    model = distill(teacher_weights)
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(model, datamodule=dm)
    ckpt = tmp_path / "distill.ckpt"
    t.save_checkpoint(ckpt)
    probe = LinearProbe(num_classes=dm.num_classes, features=Features(checkpoint=str(ckpt)), backbone=STUDENT)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(probe.backbone.state_dict()[k], v), k
    t2 = trainer(tmp_path, max_epochs=2)
    t2.fit(probe, datamodule=dm)
    metrics = t2.validate(probe, datamodule=dm, verbose=False)[0]
    assert 0 <= metrics["val/top1"] <= 1


def test_cli_fit_and_pipeline_stage(
    image_folder: Path, tmp_path: Path, teacher_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs/distill/cifar10.yaml"
    main(
        [
            "fit",
            *("--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(config)),
            *("--model.init_args.backbone.name", "small_cnn", "--model.init_args.backbone.width", "8"),
            *("--model.init_args.teacher.name", "small_cnn", "--model.init_args.teacher.width", "16"),
            *("--model.init_args.teacher.weights", str(teacher_weights)),
            *("--model.init_args.optimizer.name", "adam", "--model.init_args.optimizer.lr", "0.002"),
            *("--data.root", str(image_folder), "--data.batch_size", "16"),
            *("--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"),
            *("--trainer.enable_progress_bar", "false"),
        ]
    )
    run_dir = tmp_path / "runs" / "distill"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["teacher"]["weights"] == str(teacher_weights)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    student = BackboneSpec.of(STUDENT).build().state_dict()
    assert {k.removeprefix("backbone.") for k in state if k.startswith("backbone.")} == student.keys()
    assert not any(k.startswith("teacher.") for k in state)

    # As a pipeline stage: the shared backbone is the student, the stage's model names the teacher's weights.
    stage = Stage(config=str(config), model={"teacher": {**TEACHER, "weights": str(teacher_weights)}})
    shared = {"backbone": BackboneSpec.of(STUDENT).as_dict()}
    module, warmup = stage_model("distill", stage, shared, [REPO / "configs"], num_classes=3)
    assert isinstance(module, Distill) and warmup["warmup_epochs"] == 10
    assert module.hparams["teacher"]["weights"] == str(teacher_weights)
    assert module.hparams["backbone"]["width"] == 8 and module.teacher.num_features == 64
