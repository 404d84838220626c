"""The momentum part MoCo and BYOL share: MoCo trains as it did before the part was shared, and
BYOL's target follows the schedule through a real Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from selfsup.data import ImageDataModule
from selfsup.evaluation.online import OnlineSpec
from selfsup.methods import BYOL, MoCo
from selfsup.models.momentum import cosine_momentum

from conftest import cpu_trainer

TINY = {"backbone": {"name": "small_cnn", "width": 8}, "proj_hidden": 16, "online": OnlineSpec(enabled=False)}


class MoCoBefore(MoCo):
    """MoCo with its key encoder's update as it was written in MoCo before selfsup 0.4."""

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.hp.key_momentum
        for q_mod, k_mod in ((self.backbone, self.key_backbone), (self.projector, self.key_projector)):
            for q, k in zip(q_mod.state_dict().values(), k_mod.state_dict().values(), strict=True):
                if k.dtype.is_floating_point:
                    k.mul_(m).add_(q.detach(), alpha=1 - m)
                else:
                    k.copy_(q)


def test_moco_trains_bit_for_bit_as_before_the_shared_momentum_part(dm: ImageDataModule, tmp_path: Path) -> None:
    weights = []
    for cls in (MoCo, MoCoBefore):
        L.seed_everything(0)
        model = cls(**TINY, queue_size=64)
        cpu_trainer(tmp_path / cls.__name__, max_epochs=2, enable_checkpointing=False).fit(model, datamodule=dm)
        weights.append(model.state_dict())
    now, before = weights
    assert now.keys() == before.keys()
    assert not [k for k in now if not torch.equal(now[k], before[k])]
    assert not torch.equal(now["key_backbone.stem.0.weight"], now["backbone.stem.0.weight"])  # it moved


class Recorded(BYOL):
    """BYOL noting the momentum each optimizer step's target update used."""

    def update_target(self) -> None:
        self.used = [*getattr(self, "used", []), (self.global_step, self.momentum())]
        super().update_target()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_byol_target_moves_once_a_step_on_the_cosine_schedule(
    accumulate: int, dm: ImageDataModule, tmp_path: Path
) -> None:
    L.seed_everything(0)
    model = Recorded(**TINY, pred_hidden=16, target_momentum=0.9)
    trainer = cpu_trainer(tmp_path, max_epochs=2, enable_checkpointing=False, accumulate_grad_batches=accumulate)
    trainer.fit(model, datamodule=dm)
    total = trainer.estimated_stepping_batches
    assert [step for step, _ in model.used] == list(range(total))  # once per optimizer step
    assert model.used[0][1] == pytest.approx(0.9)
    assert [m for _, m in model.used] == [cosine_momentum(k, total, 0.9) for k in range(total)]
    assert model.used[-1][1] > 0.99  # near 1 at the end
