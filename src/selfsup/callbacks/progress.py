"""The progress bar of every selfsup run: Lightning's tqdm bar, safe under DDP."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar that, under DDP, does not ask for a training epoch's metrics at its
    end. Computing them syncs the torchmetrics objects across processes, and only rank zero has a
    bar: it would wait in that sync while the other ranks go on to their next collective (the
    online kNN's gather), and the job would hang. The figures are shown after validation instead."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            if self._leave:
                self.train_progress_bar.close()
            return
        super().on_train_epoch_end(trainer, pl_module)
