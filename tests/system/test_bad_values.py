"""Bad values end in one line naming the key, the value and the range: exit 2, no traceback.

Each case runs the ``selfsup`` command itself (in this process), as a user would type it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from selfsup.cli import main

from conftest import REPO, SMALL_SIMCLR

FIT = ["fit", *SMALL_SIMCLR, "--trainer.logger", "false"]
MOCO = ["fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/moco/cifar10.yaml")]
PATCHES = [
    *("fit", "--config", str(REPO / "configs/trainer/cpu.yaml")),
    *("--config", str(REPO / "configs/relative_location/cifar10.yaml")),
]
BYOL = ["fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/byol/cifar10.yaml")]
VICREG = ["fit", "--config", str(REPO / "configs/trainer/cpu.yaml")]
VICREG += ["--config", str(REPO / "configs/vicreg/cifar10.yaml")]
DINO = ["fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/dino/cifar10.yaml")]
MAE = ["fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/mae/cifar10.yaml")]
KNN = ["validate", "--config", str(REPO / "configs/trainer/cpu.yaml")]
KNN += ["--config", str(REPO / "configs/knn/cifar10.yaml")]
PROBE = ["fit", "--config", str(REPO / "configs/trainer/cpu.yaml")]
PROBE += ["--config", str(REPO / "configs/linear_probe/cifar10.yaml")]

#: (command, the bad setting, its value, what the line must say)
CASES = [
    (FIT, "data.batch_size", "0", "data.batch_size must be at least 1, got 0"),
    (FIT, "data.batch_size", "-4", "data.batch_size must be at least 1, got -4"),
    (FIT, "data.image_size", "0", "data.image_size must be at least 8, got 0"),
    (FIT, "data.eval_batch_size", "0", "data.eval_batch_size must be at least 1, got 0"),
    (FIT, "data.val_fraction", "1.5", "data.val_fraction must be in (0, 1), got 1.5"),
    (FIT, "data.num_workers", "-1", "data.num_workers must be at least 0, got -1"),
    (FIT, "data.max_train_images", "0", "data.max_train_images must be at least 1, got 0"),
    (FIT, "data.max_eval_images", "-5", "data.max_eval_images must be at least 1, got -5"),
    (FIT, "data.decode_workers", "0", "data.decode_workers must be at least 1, got 0"),
    (FIT, "data.seed", "-1", "data.seed must be at least 0, got -1"),
    (FIT, "model.init_args.optimizer.lr", "-0.1", "model.init_args.optimizer.lr must be at least 0, got -0.1"),
    (FIT, "model.init_args.optimizer.weight_decay", "-1", "optimizer.weight_decay must be at least 0, got -1"),
    (FIT, "model.init_args.optimizer.momentum", "1.5", "optimizer.momentum must be in [0, 1), got 1.5"),
    (FIT, "model.init_args.temperature", "0", "model.init_args.temperature must be more than 0, got 0"),
    (FIT, "model.init_args.proj_dim", "0", "model.init_args.proj_dim must be at least 1, got 0"),
    (FIT, "model.init_args.proj_hidden", "-2", "model.init_args.proj_hidden must be at least 1, got -2"),
    (FIT, "model.init_args.views.crop_min_scale", "0", "views.crop_min_scale must be in (0, 1], got 0"),
    (FIT, "model.init_args.views.size", "4", "model.init_args.views.size must be at least 8, got 4"),
    (FIT, "model.init_args.online.knn_k", "0", "model.init_args.online.knn_k must be at least 1, got 0"),
    (FIT, "model.init_args.online.knn_every", "-1", "online.knn_every must be at least 0, got -1"),
    (FIT, "model.init_args.online.lr", "-1", "model.init_args.online.lr must be at least 0, got -1"),
    (FIT, "model.init_args.backbone.width", "0", "model.init_args.backbone.width must be at least 1, got 0"),
    (FIT, "trainer.max_epochs", "-3", "bad trainer setting: `max_epochs` must be a non-negative integer or -1"),
    (FIT, "warmup.warmup_epochs", "-1", "warmup.warmup_epochs must be at least 0, got -1"),
    (FIT, "warmup.warmup_steps", "-1", "warmup.warmup_steps must be at least 0, got -1"),
    (FIT, "warmup.final_fraction", "2", "warmup.final_fraction must be in [0, 1], got 2"),
    (FIT, "checkpoint.every_n_steps", "0", "checkpoint.every_n_steps must be at least 1, got 0"),
    (FIT, "checkpoint.every_minutes", "0", "checkpoint.every_minutes must be more than 0, got 0"),
    (FIT, "lr_scaling.reference_batch", "0", "lr_scaling.reference_batch must be positive, got 0"),
    (MOCO, "model.init_args.queue_size", "0", "model.init_args.queue_size must be at least 1, got 0"),
    (MOCO, "model.init_args.key_momentum", "1.5", "model.init_args.key_momentum must be in [0, 1), got 1.5"),
    (BYOL, "model.init_args.target_momentum", "1", "model.init_args.target_momentum must be in [0, 1), got 1"),
    (BYOL, "model.init_args.pred_hidden", "0", "model.init_args.pred_hidden must be at least 1, got 0"),
    (VICREG, "model.init_args.expander_dim", "0", "model.init_args.expander_dim must be at least 1, got 0"),
    (VICREG, "model.init_args.variance_weight", "-1", "model.init_args.variance_weight must be at least 0, got -1"),
    (DINO, "model.init_args.teacher_temp", "0", "model.init_args.teacher_temp must be more than 0, got 0"),
    (DINO, "model.init_args.crops.num_local", "-1", "model.init_args.crops.num_local must be in [0, 32], got -1"),
    (DINO, "model.init_args.backbone.patch_size", "5", "backbone.image_size 32 is not a multiple of patch_size 5"),
    (MAE, "model.init_args.mask_ratio", "1", "model.init_args.mask_ratio must be in (0, 1), got 1"),
    (MAE, "model.init_args.backbone.name", "small_cnn", "image_size, patch_size, pool and timm_kwargs apply to timm"),
    (MAE, "model.init_args.optimizer.betas", "[0.9, 1.5]", "model.init_args.optimizer.betas[1] must be in [0, 1)"),
    (PATCHES, "model.init_args.gray_p", "2", "model.init_args.gray_p must be in [0, 1], got 2"),
    (PATCHES, "model.init_args.dropout", "1", "model.init_args.dropout must be in [0, 1), got 1"),
    (PATCHES, "model.init_args.gap", "-1", "model.init_args.gap must be at least 0, got -1"),
    (KNN, "model.init_args.temperature", "0", "model.init_args.temperature must be more than 0, got 0"),
    (KNN, "model.init_args.k", "[0]", "model.init_args.k must name one or more neighbor counts of 1 or more"),
    (PROBE, "model.init_args.crop_min_scale", "1.5", "model.init_args.crop_min_scale must be in (0, 1], got 1.5"),
    (PROBE, "model.init_args.search.lrs", "[0.1, -1]", "model.init_args.search.lrs must be more than 0, got -1"),
]


def one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``selfsup ARGV``; the one error line it ends with (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2, (out + err)[-2000:]
    assert "Traceback" not in out + err
    lines = [x for x in err.splitlines() if x.startswith("selfsup: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.mark.parametrize(("command", "key", "value", "said"), CASES, ids=[f"{c[1]}={c[2]}" for c in CASES])
def test_a_bad_value_is_one_line_naming_key_value_and_range(
    command: list[str], key: str, value: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_line([*command, f"--{key}", value, "--trainer.default_root_dir", str(tmp_path / "run")], capsys)
    assert said in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before anything trained


class NotATensor:
    """An arbitrary object: what a pickled model or a hostile file holds."""


def test_a_file_that_is_not_a_safe_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": NotATensor()}, evil)
    run = ["--trainer.default_root_dir", str(tmp_path / "run")]
    safely = f"not a checkpoint selfsup can read safely: {evil} ("
    # Given to export, given as --ckpt_path, and found as the run folder's last.ckpt.
    assert one_line(["export", "--ckpt", str(evil), "--out", str(tmp_path / "out.pt")], capsys).startswith(
        f"selfsup: error: {safely}"
    )
    assert safely in one_line([*FIT, *run, "--ckpt_path", str(evil)], capsys)
    found = tmp_path / "run" / "checkpoints" / "last.ckpt"
    found.parent.mkdir(parents=True)
    found.write_bytes(evil.read_bytes())
    line = one_line([*FIT, *run], capsys)
    assert f"not a checkpoint selfsup can read safely: {found} (" in line and "NotATensor" in line


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    line = one_line([*FIT, "--trainer.default_root_dir", str(blocker / "run")], capsys)
    where = re.escape(str(blocker / "run"))
    assert re.search(rf"cannot write in {where} \(.+\): choose a folder you can write to", line)


def test_a_pipeline_stage_budget_out_of_range_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs/pipeline/quickstart.yaml")
    args = ["pipeline", "--config", config, "--out", str(tmp_path / "out"), "--wandb.enabled", "false"]
    line = one_line([*args, "--stages.simclr.max_epochs", "-2"], capsys)
    assert "stages.simclr.max_epochs must be at least 0, got -2" in line
    line = one_line([*args, "--data.batch_size", "0"], capsys)
    assert "data.batch_size must be at least 1, got 0" in line
