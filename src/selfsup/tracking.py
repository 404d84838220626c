"""Run tracking: a W&B logger that never blocks for lack of an account or a network."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from selfsup.files import write_atomic


def wandb_has_account() -> bool:
    """True when W&B credentials are configured (``WANDB_API_KEY`` or a netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_offline(offline: bool | None) -> bool:
    """None means: offline unless an account is configured; ``WANDB_MODE`` still wins."""
    if offline is not None:
        return offline
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online":
        return False
    return not wandb_has_account()


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger, offline when no account is configured.

    Offline runs are written under ``save_dir/wandb`` and can be uploaded later with
    ``wandb sync``. Args as Lightning's ``WandbLogger``; ``offline=None`` decides by itself.
    """

    def __init__(
        self,
        project: str = "selfsup",
        name: str | None = None,
        save_dir: str = "runs",
        group: str | None = None,
        tags: list[str] | None = None,
        offline: bool | None = None,
        **kwargs: Any,
    ) -> None:
        # Absolute: W&B's service process may have been started from another directory.
        save_dir = os.path.abspath(save_dir)
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            group=group,
            tags=tags,
            offline=resolve_offline(offline),
            **kwargs,
        )
        # Lightning always passes the setting, which W&B 0.2x+ deprecates with a warning per run.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def finish_wandb(trainer: Trainer) -> None:
    """Close the W&B runs of a finished command, so that its files are complete on disk and a
    later command in the same process starts a run of its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def wandb_run_id(root: Path) -> str:
    """The W&B run id of a run folder, made once and kept in ``wandb_id`` there."""
    path = root / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if getattr(rank_zero_only, "rank", 0) == 0:
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(path, run_id + "\n")
    return run_id
