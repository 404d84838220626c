"""The stages chained end to end on a tiny model, and the CLI's handling of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfsup import SelfsupError
from selfsup.cli import main as cli_main
from selfsup.pipeline import pipeline_main

from conftest import write_image_folder
from wandb_files import logged_config, logged_metric_keys

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--backbone.width",
    "8",
    "--data.batch_size",
    "32",
    "--stages.relative_location.max_epochs",
    "1",
    "--stages.simclr.max_epochs",
    "1",
    "--evaluations.linear.max_epochs",
    "2",
    "--stages.relative_location.model",
    '{"per_patch_norm": true, "optimizer": {"lr": 0.002}, "head_hidden": 32}',
    "--stages.simclr.model",
    '{"temperature": 0.5, "optimizer": {"name": "adam", "lr": 0.002}, "proj_hidden": 32}',
]


def test_pipeline_chains_the_stages(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    summary = pipeline_main(
        [
            "--config",
            str(REPO / "configs/pipeline/quickstart.yaml"),
            "--data.root",
            str(image_folder),
            "--out",
            str(out),
            *TINY,
        ]
    )
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) == {
        "data_root",
        "eval_root",
        "labels",
        "image_size",
        "num_classes",
        "pretrain_images",
        "train_images",
        "eval_images",
        "evaluation_train_images",
        "in_domain",
        "images",
        "backbone",
        "start",
        "starts",
        "rankme_images",
        "results",
        "verdict",
        "wall_seconds",
        "seconds_in_all",
    }
    assert on_disk["evaluation_train_images"] == {"linear": 120, "knn": 120}
    assert on_disk["data_root"] == on_disk["eval_root"] == str(image_folder.resolve())
    assert on_disk["images"] == {"used": 150, "skipped": 0, "skipped_list": None}
    assert on_disk["labels"] == "folders" and on_disk["pretrain_images"] == 120
    assert (on_disk["image_size"], on_disk["num_classes"]) == (32, 3)
    assert (on_disk["train_images"], on_disk["eval_images"]) == (120, 30)
    assert on_disk["backbone"] == "small_cnn"
    r = on_disk["results"]
    assert set(r) == {"random", "relative_location", "simclr"}
    assert set(r["relative_location"]) == {
        "pretext_top1",
        "linear_top1",
        "linear_top5",
        "linear_top1_stage1",
        "linear_lr",
        "knn_top1",
        "knn_top5",
        "knn_top1_k20",
        "knn_top1_stage1",
        "rankme",
        "seconds",
    }
    for stage in r.values():
        assert set(stage) >= {"linear_top1", "linear_top5", "knn_top1", "knn_top1_k20", "seconds"}
        assert 0 <= stage["linear_top1"] <= 1 and 0 <= stage["knn_top1"] <= 1 and stage["seconds"] > 0
        assert stage["linear_top5"] is None and stage["knn_top5"] is None  # 3 classes: top-5 would always be 100%
        # kNN over 30 evaluation images: a whole number of them right.
        assert stage["knn_top1"] * 30 == pytest.approx(round(stage["knn_top1"] * 30), abs=1e-4)
    table = (out / "summary.md").read_text()
    assert "| SimCLR |" in table and table in capsys.readouterr().out
    assert "earlier backbone depths: depth 1 " in table
    for stage in ("relative_location", "simclr"):
        assert (out / stage / "checkpoints" / "last.ckpt").is_file()
    # Each stage has a CSV of metrics and an offline W&B run carrying the full config.
    assert "val/top1" in (out / "simclr_probe" / "metrics.csv").read_text().splitlines()[0]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 10
    by_stage = {logged_config(run)["stage"]: run for run in runs}
    assert set(by_stage) == {
        "random_probe",
        "relative_location",
        "relative_location_probe",
        "relative_location_probe_stage1",
        "simclr",
        "simclr_probe",
        "random_knn",
        "relative_location_knn",
        "relative_location_knn_stage1",
        "simclr_knn",
    }
    assert "| knn top-1 |" in table
    config = logged_config(by_stage["simclr_probe"])
    assert config["pipeline"]["backbone"]["width"] == 8
    assert config["pipeline"]["stages"]["simclr"]["model"]["temperature"] == 0.5
    assert config["optimizer"]["lr"] == 0.002  # the stage module's own hyperparameters too
    assert "val/top1" in logged_metric_keys(by_stage["simclr_probe"])
    assert "train/pretext_top1_epoch" in logged_metric_keys(by_stage["relative_location"])


def test_bad_input_gives_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 3\n")
    cases = {
        "no images found": ["pipeline", "--data.root", str(tmp_path / "empty")],
        "checkpoint not found": [
            "fit",
            "--config",
            str(REPO / "configs/linear_probe/cifar10.yaml"),
            "--model.init_args.features.checkpoint",
            "missing.ckpt",
        ],
        "batch_sise": ["fit", "--config", str(REPO / "configs/simclr/cifar10.yaml"), "--config", str(bad)],
    }
    monkeypatch.chdir(tmp_path)  # as a user in that folder: "missing.ckpt" is relative to it
    for expected, args in cases.items():
        with pytest.raises(SystemExit) as stop:
            cli_main(args)  # the command itself, in this process (its parser, its error handling)
        out, err = capsys.readouterr()
        assert stop.value.code == 2, err
        assert "Traceback" not in out + err
        errors = [ln for ln in err.splitlines() if ln.startswith("selfsup: error:")]
        assert len(errors) == 1 and expected in errors[0], err


def test_pipeline_runs_a_moco_stage_from_its_fit_config(image_folder: Path, tmp_path: Path) -> None:
    """A stage is the `selfsup fit` config it names (configs/moco/cifar10.yaml: MoCo, SGD at 0.03,
    queue 4096) with the pipeline's shared sections and the stage's overrides on top."""
    out = tmp_path / "out"
    s = pipeline_main(
        [
            "--config",
            str(REPO / "configs/pipeline/all_methods.yaml"),
            "--data.root",
            str(image_folder),
            "--out",
            str(out),
            "--backbone.width",
            "8",
            "--data.batch_size",
            "32",
            "--evaluations.linear.max_epochs",
            "1",
            # An evaluation is a stage from a fit config too: fine-tuning on a tenth of the
            # labels beside the probe, the backbone at a tenth of the head's rate.
            "--evaluations.finetune.config",
            "configs/finetune/cifar10.yaml",
            "--evaluations.finetune.max_epochs",
            "1",
            "--evaluations.finetune.data",
            '{"label_fraction": 0.1, "batch_size": 4}',
            "--evaluations.finetune.model",
            '{"backbone_lr": 0.00005}',
            "--stages.relative_location.enabled",
            "false",
            "--stages.simclr.enabled",
            "false",
            "--stages.byol.enabled",
            "false",
            "--stages.vicreg.enabled",
            "false",
            "--stages.moco.max_epochs",
            "1",
            "--stages.moco.model",
            '{"proj_hidden": 16, "queue_size": 64}',
            "--stages.moco.probe_depths",
            "[-2]",
            "--wandb.enabled",
            "false",
        ]
    )
    assert set(s["results"]) == {"random", "moco"}
    assert s["evaluation_train_images"]["finetune"] == 12  # 10% of each class's 40 training images
    # Earlier depths: the probe and kNN look there; fine-tuning trains the whole backbone, so not.
    assert {"linear_top1_stage1", "knn_top1_stage1"} <= set(s["results"]["moco"])
    assert not any(k.startswith("finetune_top1_stage") for k in s["results"]["moco"])
    for entry in s["results"].values():
        assert 0 <= entry["linear_top1"] <= 1 and 0 <= entry["finetune_top1"] <= 1
    ckpt = torch.load(out / "moco" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert (hp["queue_size"], hp["proj_hidden"]) == (64, 16)
    shared = {"name": "small_cnn", "cifar_stem": False, "width": 8, "norm": "batch", "weights": None}
    shared |= {"image_size": None, "patch_size": None, "pool": None, "timm_kwargs": None}
    assert hp["backbone"] == shared  # the shared section
    # From configs/moco/cifar10.yaml: SGD at 0.03, temperature 0.2; the stage overrides the queue.
    assert (hp["optimizer"]["name"], hp["optimizer"]["lr"], hp["temperature"]) == ("sgd", 0.03, 0.2)
    table = (out / "summary.md").read_text()
    assert "| MoCo |" in table and "| finetune top-1 |" in table
    assert not (out / "moco_finetune" / "checkpoints").exists()  # evaluations keep no checkpoints
    assert "val/top1" in (out / "moco_finetune" / "metrics.csv").read_text().splitlines()[0]


def test_byol_and_vicreg_run_as_pipeline_stages_of_all_methods(image_folder: Path, tmp_path: Path) -> None:
    """BYOL and VICReg from their fit configs, on the budget all_methods gives every method."""
    out = tmp_path / "out"
    s = pipeline_main(
        [
            *("--config", str(REPO / "configs/pipeline/all_methods.yaml")),
            *("--data.root", str(image_folder), "--out", str(out), "--backbone.width", "8"),
            *("--data.batch_size", "32", "--evaluations.linear.max_epochs", "1", "--wandb.enabled", "false"),
            *("--stages.relative_location.enabled", "false", "--stages.simclr.enabled", "false"),
            *("--stages.moco.enabled", "false", "--stages.byol.max_epochs", "1", "--stages.vicreg.max_epochs", "1"),
            *("--stages.byol.model", '{"proj_hidden": 16, "pred_hidden": 16}'),
            *("--stages.vicreg.model", '{"expander_dim": 16}'),
        ]
    )
    assert set(s["results"]) == {"random", "byol", "vicreg"}
    for name in ("byol", "vicreg"):
        assert 0 <= s["results"][name]["linear_top1"] <= 1 and 0 <= s["results"][name]["knn_top1"] <= 1
    byol = torch.load(out / "byol" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # From configs/byol/cifar10.yaml (the model given here replaces all_methods' override): LARS at
    # 1.0, momentum 0.99, with the widths given here.
    hp = byol["hyper_parameters"]
    assert (hp["optimizer"]["name"], hp["optimizer"]["lr"], hp["target_momentum"]) == ("lars", 1.0, 0.99)
    assert (hp["proj_hidden"], hp["pred_hidden"], hp["proj_dim"]) == (16, 16, 256)
    assert any(k.startswith("target_backbone.") for k in byol["state_dict"])
    vicreg = torch.load(out / "vicreg" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert vicreg["hyper_parameters"]["expander_dim"] == 16
    table = (out / "summary.md").read_text()
    assert "| BYOL |" in table and "| VICReg |" in table


def test_dino_and_mae_run_as_pipeline_stages_of_vit(image_folder: Path, tmp_path: Path) -> None:
    """configs/pipeline/vit.yaml with a ViT of 1 block: DINO and MAE train on the shared ViT and
    every backbone is probed, kNN-evaluated and fine-tuned; the best exports to timm."""
    out = tmp_path / "out"
    vit = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    s = pipeline_main(
        [
            *("--config", str(REPO / "configs/pipeline/vit.yaml")),
            *("--data.root", str(image_folder), "--out", str(out), "--backbone.timm_kwargs", json.dumps(vit)),
            *("--data.batch_size", "32", "--evaluations.linear.max_epochs", "1", "--wandb.enabled", "false"),
            *("--evaluations.finetune_10pct.max_epochs", "1", "--evaluations.finetune_10pct.data"),
            '{"label_fraction": 0.1, "batch_size": 4}',
            *("--stages.simclr.enabled", "false", "--stages.dino.max_epochs", "1", "--stages.mae.max_epochs", "1"),
        ]
    )
    assert set(s["results"]) == {"random", "dino", "mae"}
    for entry in s["results"].values():
        assert all(0 <= entry[k] <= 1 for k in ("linear_top1", "knn_top1", "finetune_10pct_top1"))
    for name, own in (("dino", "teacher_head."), ("mae", "decoder.")):
        ckpt = torch.load(out / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert any(k.startswith(own) for k in ckpt["state_dict"])
        hp = ckpt["hyper_parameters"]
        assert hp["backbone"]["timm_kwargs"] == vit and (
            hp["backbone"]["image_size"],
            hp["backbone"]["patch_size"],
        ) == (32, 4)
        assert hp["optimizer"]["name"] == "adamw"
    assert (out / "mae" / "val_reconstruction.png").is_file() and (out / "dino" / "train_views.png").is_file()
    table = (out / "summary.md").read_text()
    assert "| DINO |" in table and "| MAE |" in table and "| finetune_10pct top-1 |" in table
    card = json.loads((out / "best" / "backbone.pt.json").read_text())
    assert card["format"] == "timm" and card["timm_args"]["img_size"] == 32


def test_transfer_and_in_domain_figures_side_by_side(image_folder: Path, tmp_path: Path) -> None:
    """Pretraining on labeled images, evaluating on another labeled collection: every
    evaluation runs on both, each with its own classes and its own held-apart split."""
    other = write_image_folder(tmp_path / "other", {"train": 24, "val": 6}, classes=4, size=28)
    out = tmp_path / "out"
    s = pipeline_main(
        [
            "--config",
            str(REPO / "configs/pipeline/quickstart.yaml"),
            "--data.root",
            str(image_folder),
            "--data.eval_root",
            str(other),
            "--out",
            str(out),
            "--backbone.width",
            "8",
            "--data.batch_size",
            "16",
            "--stages.relative_location.enabled",
            "false",
            "--stages.simclr.max_epochs",
            "1",
            "--stages.simclr.model",
            '{"proj_hidden": 16}',
            "--evaluations.linear.max_epochs",
            "1",
            "--wandb.enabled",
            "false",
        ]
    )
    assert s["num_classes"] == 4 and (s["train_images"], s["eval_images"]) == (96, 24)
    assert s["in_domain"] == {"train_images": 120, "eval_images": 30, "num_classes": 3}
    for entry in ("random", "simclr"):
        r = s["results"][entry]
        for key in ("linear_top1", "linear_indomain_top1", "knn_top1", "knn_indomain_top1"):
            assert 0 <= r[key] <= 1, key
        # The probe's rate, chosen on held-out training images of each dataset.
        assert r["linear_lr"] in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3) and "linear_indomain_lr" in r
        # Each probe is built for its own data's classes.
        for run, classes in ((f"{entry}_probe", 4), (f"{entry}_probe_indomain", 3)):
            assert json.loads((out / run / "stage.json").read_text())["hparams"]["num_classes"] == classes
    table = (out / "summary.md").read_text()
    assert "| linear top-1 in-domain | linear top-1 transfer |" in table and "| knn top-1 in-domain |" in table
    assert "In-domain: trained and measured on the pretraining images' own labels (120 train" in table
    assert "rate chosen on held-out training images" in table
    # --in_domain false: transfer figures only.
    s = pipeline_main(
        [
            "--config",
            str(REPO / "configs/pipeline/quickstart.yaml"),
            "--data.root",
            str(image_folder),
            "--data.eval_root",
            str(other),
            "--out",
            str(tmp_path / "out2"),
            "--backbone.width",
            "8",
            "--data.batch_size",
            "16",
            "--stages.relative_location.enabled",
            "false",
            "--stages.simclr.enabled",
            "false",
            "--evaluations.linear.max_epochs",
            "1",
            "--wandb.enabled",
            "false",
            "--in_domain",
            "false",
        ]
    )
    assert s["in_domain"] is None and "linear_indomain_top1" not in s["results"]["random"]


def test_stage_errors_name_the_stage_before_anything_trains(image_folder: Path, tmp_path: Path) -> None:
    base = ["--data.root", str(image_folder), "--out", str(tmp_path / "out"), "--wandb.enabled", "false"]
    with pytest.raises(SelfsupError, match="stage extra names no config"):
        pipeline_main([*base, "--stages.extra.max_epochs", "1"])
    with pytest.raises(SelfsupError, match="stage extra: config not found: nowhere.yaml"):
        pipeline_main([*base, "--stages.extra.config", "nowhere.yaml"])
    with pytest.raises(SelfsupError, match="tempreature"):
        pipeline_main(
            [
                *base,
                "--stages.extra.config",
                str(REPO / "configs/simclr/cifar10.yaml"),
                "--stages.extra.model",
                '{"tempreature": 0.1}',
            ]
        )
    assert not (tmp_path / "out" / "random_probe").exists()  # no stage started


def test_the_whole_pipeline_runs_on_a_streamed_dataset(image_folder: Path, tmp_path: Path) -> None:
    """Pretraining, evaluations and the label-fraction fine-tuning read a LitData dataset:
    nothing decoded ahead, the same summary as from the folder."""
    pytest.importorskip("litdata")
    from selfsup.data.litdata.write import optimize_folder

    optimize_folder(image_folder, tmp_path / "optimized", workers=2)
    out = tmp_path / "out"
    s = pipeline_main(
        [
            "--config",
            str(REPO / "configs/pipeline/quickstart.yaml"),
            "--data.source",
            "stream",
            "--data.root",
            str(tmp_path / "optimized"),
            "--data.num_workers",
            "1",
            "--out",
            str(out),
            *TINY,
            "--evaluations.finetune",
            json.dumps(
                {
                    "config": str(REPO / "configs/finetune/cifar10.yaml"),
                    "max_epochs": 1,
                    "data": {"label_fraction": 0.5, "batch_size": 16},
                }
            ),
            "--wandb.enabled",
            "false",
        ]
    )
    assert (s["pretrain_images"], s["train_images"], s["eval_images"], s["num_classes"]) == (120, 120, 30, 3)
    assert s["data_root"] == str(tmp_path / "optimized")
    assert s["evaluation_train_images"]["finetune"] == 60
    assert s["images"] == {"used": 150, "skipped": 0, "skipped_list": None}
    for entry in ("random", "relative_location", "simclr"):
        r = s["results"][entry]
        for key in ("linear_top1", "knn_top1", "finetune_top1"):
            assert 0 <= r[key] <= 1, (entry, key)
    assert 0 <= s["results"]["relative_location"]["pretext_top1"] <= 1
    assert "| SimCLR |" in (out / "summary.md").read_text()


def test_a_two_process_pipeline_prints_and_writes_one_summary(image_folder: Path, tmp_path: Path) -> None:
    """On 2 CPU processes (gloo): one table, written once by rank zero, the same figures as printed,
    and no library warning a single-process run does not show."""
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline"}
    done = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "selfsup.cli",
                "pipeline",
                "--config",
                str(REPO / "configs/pipeline/quickstart.yaml"),
            ),
            *("--data.root", str(image_folder), "--out", str(out), "--data.batch_size", "16"),
            *("--backbone.width", "8", "--wandb.enabled", "false", "--stages.relative_location.enabled", "false"),
            *("--stages.simclr.max_epochs", "1", "--evaluations.linear.max_epochs", "2"),
            *("--trainer", '{"accelerator": "cpu", "devices": 2, "strategy": "ddp"}'),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert said.count("s in all.") == 1  # the table's last line, printed once
    s = json.loads((out / "summary.json").read_text())
    assert f"{s['wall_seconds']:.0f} s in all." in done.stdout  # the printed table is the written one
    assert (out / "summary.md").read_text().strip() in done.stdout
    for noise in ("deprecated", "DistributedSampler", "[rank 1]", "Traceback"):
        assert noise not in said, noise
