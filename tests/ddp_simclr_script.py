"""Run by test_ddp.py: SimCLR (or MoCo) for a few steps on 2 CPU processes (gloo), recording what
each rank saw; or a linear probe with its search (``probe``).

    python tests/ddp_simclr_script.py IMAGE_ROOT OUT_DIR [simclr|moco|probe|stream]

``stream``: SimCLR for 2 epochs on IMAGE_ROOT as written by ``selfsup data optimize``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

# Both ranks run this file: on SIGUSR2 a process (and each DataLoader worker forked from it)
# appends where its threads wait to the file the test named, which reports it on a hang. Set
# before the slow imports, so that a process is never ended by the signal instead.
if os.environ.get("SELFSUP_TEST_STACKS"):
    _stacks = open(os.environ["SELFSUP_TEST_STACKS"], "a")  # noqa: SIM115 (kept open for the handler)
    faulthandler.register(signal.SIGUSR2, file=_stacks, all_threads=True)

import lightning as L  # noqa: E402
import torch  # noqa: E402

from selfsup.callbacks import LearningRateScaling, Warmup  # noqa: E402
from selfsup.data import ImageDataModule  # noqa: E402
from selfsup.distributed import gather_with_grad, world_size  # noqa: E402
from selfsup.evaluation.online import OnlineSpec  # noqa: E402
from selfsup.evaluation.probe_search import ProbeSearch  # noqa: E402
from selfsup.methods import LinearProbe, MoCo, SimCLR  # noqa: E402


class Record(L.Callback):
    def __init__(self) -> None:
        self.indices: list[int] = []
        self.by_epoch: dict[int, list[int]] = {}
        self.keys: set[str] = set()
        self.global_batches: list[int] = []
        self.losses: list[float] = []
        self.step_lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.indices += batch["index"].tolist()
        self.by_epoch.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())
        self.keys |= set(batch)
        # The gather NT-Xent uses, inside the Trainer's process group.
        self.global_batches.append(int(gather_with_grad(torch.zeros(len(batch["index"]), 1)).shape[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.step_lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def probe(root: str, out: Path) -> None:
    """The search on two ranks: each computes half the training features, both get all of them
    and train with one choice."""
    L.seed_everything(0)
    dm = ImageDataModule(root=root, batch_size=10)
    model = LinearProbe(
        num_classes=dm.num_classes,
        backbone={"name": "small_cnn", "width": 8},
        search=ProbeSearch(lrs=(1e-3, 1e-2), weight_decays=(0.0, 1e-3)),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[LearningRateScaling("sqrt", 256), Warmup()],
        default_root_dir=str(out),
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    feats, filled = model._cache["train"]
    (out / f"probe_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "table": model.chosen.table,
                "lr": model.chosen.lr,
                "features": feats.tolist(),
                "filled": bool(filled.all()),
                "optimizer_lr": trainer.optimizers[0].param_groups[0]["lr"],
                "top1": float(trainer.callback_metrics["val/top1"]),
            }
        )
    )


def main() -> None:
    root, out = sys.argv[1], Path(sys.argv[2])
    method = sys.argv[3] if len(sys.argv) > 3 else "simclr"
    if method == "probe":
        return probe(root, out)
    L.seed_everything(0)
    stream = method == "stream"
    dm = (
        ImageDataModule(root=root, source="stream", image_size=32, batch_size=10, num_workers=1)
        if stream
        else ImageDataModule(root=root, batch_size=10)
    )
    kw = {
        "backbone": {"name": "small_cnn", "width": 8},
        "proj_hidden": 16,
        "proj_dim": 8,
        "online": OnlineSpec(knn_every=1),
        "num_classes": dm.num_classes,
    }
    model = MoCo(**kw, queue_size=50) if method == "moco" else SimCLR(**kw)
    rec = Record()
    scaling = LearningRateScaling("linear", reference_batch=256)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2 if stream else 1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[rec, scaling, Warmup(decay="constant")],
        default_root_dir=str(out),
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    (out / f"{method}_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "world_size": trainer.world_size,
                "torch_world_size": world_size(),
                "indices": rec.indices,
                "global_batches": rec.global_batches,
                "step_lrs": rec.step_lrs,
                "lr_global_batch": scaling.global_batch,
                "lr": scaling.target_lrs[0][0],
                "losses": rec.losses,
                "num_train": len(dm.train_set),
                "queue": model.queue.tolist() if method == "moco" else None,
                "queue_ptr": int(model.queue_ptr) if method == "moco" else None,
                "knn_top1": float(trainer.callback_metrics["val/knn_top1"]),
                "by_epoch": rec.by_epoch,
                "batch_keys": sorted(rec.keys),
            }
        )
    )


if __name__ == "__main__":
    main()
