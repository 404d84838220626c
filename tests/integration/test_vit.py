"""Vision transformers at CIFAR size through a real Trainer: every method trains a step on a ViT
at 32 px with 4-pixel patches, and its export loads into timm with the same features; DINO's
teacher and schedules; MAE's encoder sees the kept patches only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision

from selfsup import SelfsupError
from selfsup.data import ImageDataModule
from selfsup.evaluation import FineTune
from selfsup.evaluation.online import OnlineSpec
from selfsup.export import export_backbone
from selfsup.methods import BYOL, DINO, MAE, SimCLR
from selfsup.models import BackboneSpec
from selfsup.models.momentum import cosine_momentum
from selfsup.optim import OptimizerSpec

from conftest import cpu_trainer

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed, resample_patch_embed  # noqa: E402  (timm is optional)

#: A ViT-Tiny cut to 2 blocks of width 48 on 4-pixel patches of 32-pixel images (64 tokens).
VIT = {
    "name": "timm:vit_tiny_patch16_224",
    "image_size": 32,
    "patch_size": 4,
    "timm_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
}
OFF = OnlineSpec(enabled=False)
SMALL_DINO = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "crops": {"local_size": 16, "num_local": 2}}
SMALL_MAE = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
METHODS = {
    "simclr": lambda vit: SimCLR(backbone=vit, proj_hidden=16, online=OFF),
    "byol": lambda vit: BYOL(backbone=vit, proj_hidden=16, pred_hidden=16, online=OFF),
    "dino": lambda vit: DINO(backbone=vit, online=OFF, **SMALL_DINO),
    "mae": lambda vit: MAE(backbone=vit, online=OFF, **SMALL_MAE),
}


@pytest.mark.parametrize(("method", "pool"), [(m, "token") for m in METHODS] + [("dino", "avg"), ("mae", "avg")])
def test_a_vit_at_32_px_trains_a_step_and_exports_to_timm_with_equal_features(
    method: str, pool: str, dm: ImageDataModule, tmp_path: Path
) -> None:
    L.seed_everything(0)
    model = METHODS[method]({**VIT, "pool": pool})
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one optimizer step moves the backbone"
    ckpt = tmp_path / "step.ckpt"
    trainer.save_checkpoint(ckpt)
    card = export_backbone(ckpt, tmp_path / "vit.pt", "timm")
    assert card["timm_args"] == {
        "img_size": 32,
        "patch_size": 4,
        "dynamic_img_size": True,
        "global_pool": pool,
        **VIT["timm_kwargs"],
    }
    assert json.loads((tmp_path / "vit.pt.json").read_text())["timm_args"] == card["timm_args"]
    # A user's side: timm builds the model from the card and takes the weights strictly.
    theirs = timm.create_model(card["arch"], pretrained=False, num_classes=0, **card["timm_args"]).eval()
    theirs.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    model.backbone.eval()
    with torch.no_grad():
        assert torch.equal(theirs(x), model.backbone(x))


def test_vit_backbones_take_their_size_and_pool_and_say_what_does_not_fit() -> None:
    vit = BackboneSpec(**VIT).build()
    assert vit.num_features == 48
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 48)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 48)  # DINO's local crops: positions interpolated
    model = vit.model  # type: ignore[union-attr]
    assert model.patch_embed.grid_size == (8, 8) and model.global_pool == "token"
    assert BackboneSpec(**{**VIT, "pool": "avg"}).build().model.global_pool == "avg"  # type: ignore[union-attr]
    with pytest.raises(SelfsupError, match="not a multiple of patch_size"):
        BackboneSpec(**{**VIT, "image_size": 30})
    with pytest.raises(SelfsupError, match="apply to timm models"):
        BackboneSpec(name="small_cnn", image_size=32).build()
    with pytest.raises(SelfsupError, match="MAE needs a timm vision transformer"):
        MAE(backbone={"name": "small_cnn", "width": 8})


class RecordedDINO(DINO):
    """DINO checking each teacher update against the formula and noting its momentum."""

    def update_teacher(self) -> None:
        m = self.momentum()
        student = {**self.backbone.state_dict(), **{f"h.{k}": v for k, v in self.head.state_dict().items()}}
        teacher = {
            **self.teacher_backbone.state_dict(),
            **{f"h.{k}": v for k, v in self.teacher_head.state_dict().items()},
        }
        expected = {k: m * teacher[k] + (1 - m) * student[k] for k in student}
        super().update_teacher()
        after = {
            **self.teacher_backbone.state_dict(),
            **{f"h.{k}": v for k, v in self.teacher_head.state_dict().items()},
        }
        for k, v in expected.items():
            torch.testing.assert_close(after[k], v, rtol=1e-6, atol=1e-7)
        self.seen = [*getattr(self, "seen", []), (self.global_step, m, self.teacher_temperature(), self.weight_decay())]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        teacher_grads = [p.grad for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]]
        self.teacher_grads = [*getattr(self, "teacher_grads", []), *teacher_grads]
        self.decays = [*getattr(self, "decays", []), optimizer.param_groups[0]["weight_decay"]]


def test_dino_teacher_follows_the_momentum_schedule_without_gradient(dm: ImageDataModule, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = RecordedDINO(
        backbone=VIT,
        online=OFF,
        **SMALL_DINO,
        teacher_momentum=0.9,
        warmup_teacher_temp=0.02,
        teacher_temp=0.06,
        warmup_teacher_temp_epochs=3,
        weight_decay_end=0.4,
        freeze_last_layer_epochs=1,
    )
    last_layer = model.head.last_layer.parametrizations.weight.original1.detach().clone()
    trainer = cpu_trainer(tmp_path, max_epochs=3, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    total = trainer.estimated_stepping_batches  # 8 steps an epoch (120 images, batch 16)
    steps = [s for s, *_ in model.seen]
    assert steps == list(range(total))  # once per optimizer step
    assert [m for _, m, _, _ in model.seen] == [cosine_momentum(k, total, 0.9) for k in range(total)]
    per_epoch = total // 3
    temps = [t for *_, t, _ in model.seen]
    assert temps[0] == 0.02 and temps[per_epoch] == pytest.approx(0.04) and temps[-1] == pytest.approx(0.06)
    assert [d for *_, d in model.seen] == [cosine_momentum(k, total, 0.04, 0.4) for k in range(total)]
    assert model.decays == [cosine_momentum(k, total, 0.04, 0.4) for k in range(total)]  # what AdamW used
    assert all(g is None for g in model.teacher_grads)
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())
    # The last layer was frozen in the first epoch only: it moved in the others.
    assert not torch.equal(model.head.last_layer.parametrizations.weight.original1, last_layer)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_dino_last_layer_stays_frozen_in_the_first_epoch(dm: ImageDataModule, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = DINO(backbone=VIT, online=OFF, **SMALL_DINO, freeze_last_layer_epochs=1)
    last_layer = model.head.last_layer.parametrizations.weight.original1.detach().clone()
    first_mlp = model.head.mlp[0].weight.detach().clone()
    cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert torch.equal(model.head.last_layer.parametrizations.weight.original1, last_layer)
    assert not torch.equal(model.head.mlp[0].weight, first_mlp)


def test_mae_encoder_sees_the_kept_patches_only_and_draws_its_reconstruction(
    dm: ImageDataModule, tmp_path: Path
) -> None:
    L.seed_everything(0)
    model = MAE(backbone=VIT, online=OFF, **SMALL_MAE, mask_ratio=0.75)
    seen = []
    model.backbone.model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))  # type: ignore[union-attr]
    x = torch.randn(3, 3, 32, 32)
    model.loss(x, torch.Generator().manual_seed(0))
    assert seen == [(3, 1 + 16, 48)]  # the class token and 16 of 64 patches
    _, _, prediction, mask = model.loss(x, torch.Generator().manual_seed(0))
    assert prediction.shape == (3, 64, 4 * 4 * 3) and mask.sum(1).tolist() == [48, 48, 48]
    cpu_trainer(tmp_path, limit_train_batches=2).fit(model, datamodule=dm)
    figure = tmp_path / "val_reconstruction.png"
    assert figure.is_file()
    image = torchvision.io.read_image(str(figure))
    assert image.shape[1] > 3 * 32 * 3 - 1  # three rows of 32-pixel images, drawn 3 times larger


def test_vit_weights_made_at_another_size_start_a_small_vit_as_timm_resamples_them(tmp_path: Path) -> None:
    """A ViT trained at 224 px with 16-pixel patches (here: made in the test) starts a ViT at 32 px
    with 4-pixel patches: the position embeddings and patch kernel resampled as timm does."""
    args = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    big = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    torch.save(big.state_dict(), tmp_path / "vit224.pt")
    small = BackboneSpec(**{**VIT, "timm_kwargs": args, "weights": str(tmp_path / "vit224.pt")}).build()
    model = small.model  # type: ignore[union-attr]
    expected_pos = resample_abs_pos_embed(big.pos_embed.detach(), [8, 8], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed, expected_pos) and model.pos_embed.shape == (1, 65, 48)
    expected_kernel = resample_patch_embed(big.patch_embed.proj.weight.detach(), [4, 4])
    assert torch.equal(model.patch_embed.proj.weight, expected_kernel)
    assert torch.equal(model.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)  # the rest as it was
    # A width that differs is still a mismatch, named in one line.
    wider = {**VIT, "timm_kwargs": {**args, "embed_dim": 64}, "weights": str(tmp_path / "vit224.pt")}
    with pytest.raises(SelfsupError, match=r"missing keys 0 .*shape mismatches [1-9]"):
        BackboneSpec(**wider).build()


def test_fine_tuning_with_layer_decay_gives_each_block_its_rate(dm: ImageDataModule, tmp_path: Path) -> None:
    """MAE's fine-tuning recipe: the last block at the backbone's rate, each block below at 0.5
    times the one above, the embeddings lowest; the head at its own rate; every backbone
    parameter in one group, as AdamW received them."""
    model = FineTune(
        num_classes=3,
        backbone=VIT,
        optimizer=OptimizerSpec(name="adamw", lr=0.01, weight_decay=0.05),
        backbone_lr=0.004,
        layer_decay=0.5,
    )
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
    opt = model.optimizers().optimizer  # type: ignore[union-attr]
    rate_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    vit = model.backbone.model
    assert len(rate_of) == sum(1 for _ in model.parameters())  # each parameter in exactly one group
    assert [rate_of[id(p)] for p in model.classifier.parameters()] == [0.01, 0.01]  # type: ignore[union-attr]
    # 2 blocks: the last one and the final norm at 0.004, the first at 0.002, the embeddings 0.001.
    assert rate_of[id(vit.blocks[1].mlp.fc1.weight)] == rate_of[id(vit.norm.weight)] == pytest.approx(0.004)
    assert rate_of[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.002)
    for embedding in (vit.patch_embed.proj.weight, vit.pos_embed, vit.cls_token):
        assert rate_of[id(embedding)] == pytest.approx(0.001)
    assert decay_of[id(vit.pos_embed)] == decay_of[id(vit.blocks[0].norm1.weight)] == 0.0
    assert decay_of[id(vit.blocks[0].attn.qkv.weight)] == 0.05


def test_layer_decay_needs_a_vit() -> None:
    with pytest.raises(SelfsupError, match="layer_decay needs a timm vision transformer"):
        FineTune(num_classes=3, backbone={"name": "small_cnn", "width": 8}, layer_decay=0.75)
    with pytest.raises(SelfsupError, match="layer_decay"):
        FineTune(num_classes=3, backbone=VIT, layer_decay=1.5)


def test_dino_teacher_has_no_stochastic_depth_where_the_student_has() -> None:
    """With ``drop_path_rate`` and dropout in the ViT, the student drops paths in training and
    the teacher does not (DINO builds its teacher without them); both stay in train mode."""
    vit = {**VIT, "timm_kwargs": {**VIT["timm_kwargs"], "drop_path_rate": 0.5, "proj_drop_rate": 0.2}}
    model = DINO(backbone=vit, online=OFF, **SMALL_DINO).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        student = [model.backbone(x) for _ in range(2)]
        teacher = [model.teacher_backbone(x) for _ in range(2)]
    assert model.teacher_backbone.training and not torch.equal(*student)
    assert torch.equal(*teacher)
    model.teacher_backbone.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        assert torch.equal(model.teacher_backbone(x), model.backbone.eval()(x))  # the same network, no drops
