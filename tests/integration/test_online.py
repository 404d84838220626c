"""kNN monitor and online probe inside the contrastive modules."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from selfsup.data import ImageDataModule
from selfsup.evaluation.knn import knn_scores
from selfsup.evaluation.online import OnlineSpec
from selfsup.methods import BYOL, DINO, MoCo, SimCLR, VICReg

from conftest import cpu_trainer


def test_knn_scores_weighted_vote() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    q = torch.tensor([[1.0, 0.05], [0.0, 1.0]])
    s = knn_scores(q, bank, labels, num_classes=2, k=2, temperature=0.1)
    assert s.argmax(1).tolist() == [0, 1]
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top = sim[1].topk(2)
    expected = torch.zeros(2).scatter_add_(0, labels[top.indices], (top.values / 0.1).exp())
    assert torch.allclose(s[1], expected)


#: Every two-view method, each at a tiny size, its head widths apart.
TWO_VIEW = {
    SimCLR: {"proj_hidden": 16, "proj_dim": 8},
    MoCo: {"proj_hidden": 16, "proj_dim": 8},
    BYOL: {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16},
    VICReg: {"expander_dim": 16},
    DINO: {"out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8, "crops": {"num_local": 2}},
}


@pytest.mark.parametrize("cls", list(TWO_VIEW), ids=lambda c: c.__name__)
def test_online_probe_and_knn_are_logged_and_checkpointed(cls: type, dm: ImageDataModule, tmp_path: Path) -> None:
    def make() -> L.LightningModule:
        tiny = {"name": "small_cnn", "width": 8}
        return cls(backbone=tiny, online=OnlineSpec(knn_every=1), num_classes=dm.num_classes, **TWO_VIEW[cls])

    model = make()
    t = cpu_trainer(tmp_path)
    t.fit(model, datamodule=dm)
    m = t.callback_metrics
    assert 0 <= float(m["val/online_top1"]) <= 1 and 0 <= float(m["val/knn_top1"]) <= 1
    assert "train/online_top1" in m and "train/embedding_spread" in m
    ckpt = tmp_path / f"{cls.__name__}.ckpt"
    t.save_checkpoint(ckpt)
    # The head is part of the module: loading rebuilds it and restores its weights.
    loaded = cls.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.online is not None
    assert torch.equal(loaded.online.head[1].weight, model.online.head[1].weight)
    # Resume continues from the checkpoint, the online head included.
    t2 = cpu_trainer(tmp_path, max_epochs=2)
    t2.fit(make(), datamodule=dm, ckpt_path=ckpt)
    assert t2.current_epoch == 2 and "val/knn_top1" in t2.callback_metrics


def test_feature_passes_outside_the_steps_run_at_the_trainers_precision() -> None:
    """kNN banks and the probe's cached features are computed outside training_step, where
    Lightning sets no autocast: under bf16-mixed they run in bf16 all the same (and come back
    float32), under 32-true in fp32."""
    from selfsup.evaluation.features import embed_all_ranks

    net = torch.nn.Conv2d(3, 4, 3)
    seen = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        seen.append(net(x.float()).dtype)
        return net(x.float()).mean((2, 3))

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)):
        seen.clear()
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False)
        feats = embed_all_ranks(trainer, embed, images, torch.device("cpu"))
        assert seen == [dtype] and feats.dtype == torch.float32 and feats.shape == (6, 4)
