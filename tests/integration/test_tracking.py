"""W&B offline when no account is configured; the full config recorded with every CLI run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selfsup.cli import main
from selfsup.tracking import resolve_offline, wandb_has_account

from conftest import SMALL_SIMCLR
from wandb_files import logged_config, logged_metric_keys

REPO = Path(__file__).resolve().parents[2]


def test_offline_unless_an_account_is_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    assert not wandb_has_account() and resolve_offline(None) is True
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_has_account() and resolve_offline(None) is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_offline(None) is True  # the user's explicit choice wins
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_offline(None) is False and resolve_offline(True) is True


def test_cli_fit_records_full_config(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            *SMALL_SIMCLR,
            "--model.init_args.temperature",
            "0.3",
            "--data.root",
            str(image_folder),
            "--data.batch_size",
            "16",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    # One run folder, runs/<method> by default, no version counter: everything of the run is there.
    run_dir = tmp_path / "runs" / "simclr"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["temperature"] == 0.3
    assert (run_dir / "metrics.csv").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.rglob("version_*"))
    # What the network sees: image / view 0 / view 1 for 8 images, as PNG and W&B image.
    png = run_dir / "train_views.png"
    from torchvision.io import read_image

    grid = read_image(str(png))
    assert grid.shape[0] == 3 and grid.shape[1] > 3 * 32 and grid.shape[2] > 8 * 32
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    assert run.name.endswith((run_dir / "wandb_id").read_text().strip())  # resumes as the same W&B run
    config = logged_config(run)
    assert config["model"]["init_args"]["temperature"] == 0.3
    assert config["data"]["batch_size"] == 16 and config["trainer"]["max_steps"] == 2
    assert config["seed_everything"] == 0
    assert "train/views" in logged_metric_keys(run)
    # The rate's settings and the figures the run actually used, and the rate of every step.
    assert config["lr_scaling"] == {"rule": "linear", "reference_batch": 256}
    assert config["warmup"]["warmup_epochs"] == 10 and config["warmup"]["decay"] == "cosine"
    eff = config["lr_scaling_effective"]
    assert eff["global_batch"] == 16 and eff["world_size"] == 1 and eff["lr"] == pytest.approx(0.3 * 16 / 256)
    assert "lr" in logged_metric_keys(run)
