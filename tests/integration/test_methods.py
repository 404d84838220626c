"""Stage modules on a tiny model with a real Trainer, and the backbone hand-off between stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import read_image

from selfsup import SelfsupError
from selfsup.data import ImageDataModule
from selfsup.evaluation.features import Features
from selfsup.evaluation.online import OnlineSpec
from selfsup.methods import FineTune, LinearProbe, RelativeLocation, SimCLR

from conftest import cpu_trainer as trainer

TINY = {"backbone": {"name": "small_cnn", "width": 8}}


def test_relative_location_pairs_each_patch_once() -> None:
    m = RelativeLocation(**TINY)
    calls = []
    m.backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    logits, labels = m(imgs)
    assert calls == [36]  # 9 patches per image, one pass
    assert logits.shape == (32, 8) and labels.tolist() == list(range(8)) * 4
    one = RelativeLocation(**TINY, pairs="one")
    logits, labels = one(imgs, torch.Generator().manual_seed(0))
    assert logits.shape == (4, 8) and labels.shape == (4,)


def test_stages_train_and_checkpoint_hands_backbone_over(tmp_path: Path, dm: ImageDataModule) -> None:
    pre = SimCLR(**TINY, proj_hidden=16, proj_dim=8)
    t = trainer(tmp_path, max_steps=3)
    before = {k: v.clone() for k, v in pre.backbone.state_dict().items()}
    t.fit(pre, datamodule=dm)
    changed = [k for k, v in pre.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "SimCLR did not update its backbone"
    ckpt = tmp_path / "simclr.ckpt"
    t.save_checkpoint(ckpt)
    # Checkpoints hold plain types only: the safe loader accepts them.
    state = torch.load(ckpt, weights_only=True)
    hp = state["hyper_parameters"]
    # Each typed group complete, whatever part of it was given (here: the backbone's width only).
    cnn = {"name": "small_cnn", "cifar_stem": False, "width": 8, "norm": "batch", "weights": None}
    assert hp["backbone"] == {**cnn, "image_size": None, "patch_size": None, "pool": None, "timm_kwargs": None}
    assert hp["optimizer"] == {"name": "adam", "lr": 2e-3, "weight_decay": 1e-6, "momentum": 0.9, "betas": (0.9, 0.999)}
    assert hp["online"] == {"enabled": True, "lr": 1e-3, "knn_every": 5, "knn_k": 200}
    views = {"size": None, "crop_min_scale": 0.08, "compile": False, "blur_p": None, "solarize_p": (0.0, 0.0)}
    assert hp["views"] == views
    assert SimCLR.load_from_checkpoint(ckpt, weights_only=True).hparams.optimizer["lr"] == 2e-3

    probe = LinearProbe(num_classes=dm.num_classes, features=Features(checkpoint=str(ckpt)), **TINY)
    for k, v in pre.backbone.state_dict().items():
        assert torch.equal(probe.backbone.state_dict()[k], v), k
    t2 = trainer(tmp_path, max_epochs=2)
    t2.fit(probe, datamodule=dm)
    # Frozen: the probe changes neither weights nor BatchNorm statistics of the backbone.
    for k, v in pre.backbone.state_dict().items():
        assert torch.equal(probe.backbone.state_dict()[k], v), k
    metrics = t2.validate(probe, datamodule=dm, verbose=False)[0]
    # The confusion matrix of the last validation, drawn: 3 classes, per-class accuracy beside.
    (path,) = tmp_path.rglob("val_confusion.png")
    png = read_image(str(path))
    assert png.shape[0] == 3 and png.shape[1] > 3 * 28 and png.shape[2] > 3 * 28
    assert 0 <= metrics["val/top1"] <= 1
    assert not any(k.startswith("val/top3") or k.startswith("val/top5") for k in metrics)  # 3 classes: no top-k
    assert probe.hparams.num_classes == 3  # stored with the checkpoint

    ft = FineTune(num_classes=3, features=Features(checkpoint=str(ckpt)), **TINY)
    trainer(tmp_path, max_steps=2).fit(ft, datamodule=dm)
    assert any(not torch.equal(ft.backbone.state_dict()[k], v) for k, v in pre.backbone.state_dict().items())


def test_relative_location_trains_and_validates(tmp_path: Path, dm: ImageDataModule) -> None:
    m = RelativeLocation(**TINY, head_hidden=16)
    t = trainer(tmp_path, max_steps=2)
    t.fit(m, datamodule=dm)
    out = t.validate(m, datamodule=dm, verbose=False)[0]
    assert 0 <= out["val/pretext_top1"] <= 1


def test_handoff_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="checkpoint not found"):
        LinearProbe(features=Features(checkpoint=str(tmp_path / "missing.ckpt")), **TINY)
    src = SimCLR(backbone={"name": "small_cnn", "width": 16})
    path = tmp_path / "wide.ckpt"
    torch.save({"state_dict": src.state_dict()}, path)
    with pytest.raises(SelfsupError, match="shape mismatches") as e:
        LinearProbe(features=Features(checkpoint=str(path)), **TINY)
    assert "missing keys 0" in str(e.value) and "layers.0.0.weight" in str(e.value)
    other = SimCLR(backbone="resnet18")
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(SelfsupError, match=r"missing keys \d+ \(.*unexpected keys \d+ \(layer|unexpected keys"):
        LinearProbe(features=Features(checkpoint=str(path)), **TINY)
    torch.save({"state_dict": {"head.weight": torch.zeros(1)}}, path)
    with pytest.raises(SelfsupError, match="no 'backbone"):
        LinearProbe(features=Features(checkpoint=str(path)), **TINY)
    path.write_text("not a checkpoint")
    with pytest.raises(SelfsupError, match="not a checkpoint selfsup can read safely"):
        LinearProbe(features=Features(checkpoint=str(path)), **TINY)


def test_linear_probe_under_bf16_autocast(tmp_path: Path, dm: ImageDataModule) -> None:
    # The feature cache stays fp32 while the backbone runs in bf16 (a GPU run found this).
    probe = LinearProbe(num_classes=3, **TINY)
    t = trainer(tmp_path, max_epochs=2, precision="bf16-mixed")
    t.fit(probe, datamodule=dm)
    store, filled = probe._cache["train"]
    assert store.dtype == torch.float32 and int(filled.sum()) >= 112  # drop_last: 7 batches of 16 an epoch
    assert 0 <= t.validate(probe, datamodule=dm, verbose=False)[0]["val/top1"] <= 1


def test_probe_at_an_earlier_depth(tmp_path: Path, dm: ImageDataModule) -> None:
    probe = LinearProbe(num_classes=3, features=Features(depth=-2), **TINY)
    assert probe.classifier.head[1][0].in_features == 16  # small_cnn width 8: layers of 8, 16, 32 channels
    # The name the depth had before 0.2 still reads; both at once must agree.
    assert Features(stage=-2) == Features(depth=-2)
    with pytest.raises(SelfsupError, match="old name of features.depth"):
        Features(stage=-2, depth=-3)
    t = trainer(tmp_path, max_epochs=1)
    t.fit(probe, datamodule=dm)
    assert probe._cache["train"][0].shape == (120, 16)
    assert 0 <= t.validate(probe, datamodule=dm, verbose=False)[0]["val/top1"] <= 1


@pytest.mark.parametrize(
    "name, depth", [("torchvision:resnet34", -2), ("timm:resnet18", -2), ("torchvision:mobilenet_v3_small", -1)]
)
def test_named_backbone_pretrains_one_step_and_is_probed(
    name: str, depth: int, tmp_path: Path, dm: ImageDataModule
) -> None:
    """Any torchvision or timm model as the backbone: one SimCLR step, then a probe from the
    checkpoint (at an intermediate depth where the model has several) whose weights match."""
    pre = SimCLR(backbone=name, proj_hidden=16, proj_dim=8, online=OnlineSpec(enabled=False))
    before = {k: v.clone() for k, v in pre.backbone.state_dict().items()}
    t = trainer(tmp_path / "pre", max_steps=1, limit_val_batches=0)
    t.fit(pre, datamodule=dm)
    assert any(not torch.equal(before[k], v) for k, v in pre.backbone.state_dict().items())
    ckpt = tmp_path / "pre.ckpt"
    t.save_checkpoint(ckpt)
    probe = LinearProbe(num_classes=3, backbone=name, features=Features(checkpoint=str(ckpt), depth=depth))
    for k, v in pre.backbone.state_dict().items():
        assert torch.equal(probe.backbone.state_dict()[k], v), k
    t2 = trainer(tmp_path / "probe", max_epochs=1, limit_train_batches=2)
    t2.fit(probe, datamodule=dm)
    metrics = t2.validate(probe, datamodule=dm, verbose=False)[0]
    # The confusion matrix of the last validation, drawn: 3 classes, per-class accuracy beside.
    (path,) = tmp_path.rglob("val_confusion.png")
    png = read_image(str(path))
    assert png.shape[0] == 3 and png.shape[1] > 3 * 28 and png.shape[2] > 3 * 28
    assert 0 <= metrics["val/top1"] <= 1
    (linear,) = [m for m in probe.classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert linear.in_features == pre.backbone.depth_features(depth)  # the probed depth feeds the head


def test_pretext_accuracy_counts_every_pair_of_the_epoch(tmp_path: Path, image_folder: Path) -> None:
    """val/pretext_top1 is correct pairs / all pairs over the whole split (a torchmetrics metric),
    here over batches of 16 and 14 images, recomputed with the same fixed patch generators."""
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    model = RelativeLocation(**TINY, head_hidden=16)
    metrics = trainer(tmp_path).validate(model, datamodule=dm, verbose=False)[0]
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            logits, labels = model(batch["image"], torch.Generator().manual_seed(1000 + i))
            correct += int((logits.argmax(1) == labels).sum())
            total += labels.numel()
    assert total == 30 * 8
    assert metrics["val/pretext_top1"] == pytest.approx(correct / total, abs=1e-6)
