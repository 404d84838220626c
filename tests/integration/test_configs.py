"""Every config file in configs/ parses (and validates) through the real CLI parsers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from selfsup.cli import SelfsupCLI, main
from selfsup.config import ConfigError
from selfsup.pipeline import Pipeline, build_parser, stage_model, with_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
PIPELINES = [p for p in ALL if p.parent.name == "pipeline"]
TRAINERS = [p for p in ALL if p.parent.name == "trainer"]
DATA = [p for p in ALL if p.parent.name == "data"]
STAGES = [p for p in ALL if p not in PIPELINES and p not in TRAINERS and p not in DATA]


def test_there_are_configs_for_every_stage_and_preset() -> None:
    assert {p.parent.name for p in STAGES} == {
        "relative_location",
        "simclr",
        "moco",
        "byol",
        "vicreg",
        "dino",
        "mae",
        "distill",
        "linear_probe",
        "finetune",
        "knn",
    }
    assert {p.stem for p in TRAINERS} >= {"cpu", "gpu", "ddp", "ddp_cpu", "slurm"}
    assert "quickstart" in {p.stem for p in PIPELINES}


def print_config(capsys: pytest.CaptureFixture, *files: Path) -> dict:
    args = ["fit"]
    for f in files:
        args += ["--config", str(f)]
    with pytest.raises(SystemExit) as e:
        main(args + ["--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", STAGES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_config_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = print_config(capsys, CONFIGS / "trainer" / "cpu.yaml", path)
    assert cfg["model"]["class_path"].startswith(("selfsup.methods.", "selfsup.evaluation."))
    assert cfg["trainer"]["accelerator"] == "cpu"
    own = yaml.safe_load(path.read_text())
    for key, value in own["model"]["init_args"].items():
        if isinstance(
            value, dict
        ):  # backbone, optimizer, online: what the file gives, the spec's defaults for the rest
            assert cfg["model"]["init_args"][key] == {**cfg["model"]["init_args"][key], **value}, key
        else:
            assert cfg["model"]["init_args"][key] == value, key
    # The rate's callbacks: every stage config says how its rate follows the batch.
    assert set(own["lr_scaling"]) == {"rule", "reference_batch"}
    for section in ("lr_scaling", "warmup"):
        for key, value in own.get(section, {}).items():
            assert cfg[section][key] == value, (section, key)
    adam = own["model"]["init_args"].get("optimizer", {}).get("name") == "adam"  # kNN has none
    assert own["lr_scaling"]["rule"] == ("sqrt" if adam else "linear")


@pytest.mark.parametrize("path", TRAINERS, ids=lambda p: p.name)
def test_trainer_preset_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = print_config(capsys, path, CONFIGS / "simclr" / "cifar10.yaml")
    for key, value in yaml.safe_load(path.read_text())["trainer"].items():
        assert cfg["trainer"][key] == value, key


@pytest.mark.parametrize("path", DATA, ids=lambda p: p.name)
def test_data_preset_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = print_config(capsys, CONFIGS / "simclr" / "imagenette.yaml", path)
    for key, value in yaml.safe_load(path.read_text())["data"].items():
        assert cfg["data"][key] == value, key


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_config_parses(path: Path) -> None:
    cfg = build_parser().parse_args(["--config", str(path)])
    assert cfg.backbone.name in ("small_cnn", "resnet18", "resnet50", "timm:vit_tiny_patch16_224")
    assert cfg.stages and all(st.max_epochs >= 1 for st in cfg.stages.values())
    pipeline = Pipeline(cfg)
    assert "linear" in cfg.evaluations and cfg.baseline == "random"
    # Each stage's fit config and overrides build its module, evaluations included.
    names = (*cfg.stages, "start", "random")
    for name, given in [*cfg.stages.items(), *cfg.evaluations.items()]:
        # Weights that name a stage or the start are resolved by the pipeline as it runs.
        named = [k for k, v in given.model.items() if isinstance(v, dict) and v.get("weights") in names]
        stage = with_model(given, {k: {"weights": None} for k in named})
        with warnings.catch_warnings():  # a teacher left without its weights here says so
            warnings.simplefilter("ignore")
            model, warmup = stage_model(name, stage, pipeline.shared, pipeline.config_dirs, num_classes=10)
        assert type(model).__module__.startswith(("selfsup.methods.", "selfsup.evaluation.")) and isinstance(
            warmup, dict
        )
        for key, value in stage.model.items():
            if isinstance(value, dict):  # a nested section overrides key by key
                assert model.hparams[key] == {**model.hparams[key], **value}, (name, key)
            else:
                assert model.hparams[key] == value, (name, key)
        if "name" not in (stage.model.get("backbone") or {}):  # (a distillation's student may be another)
            assert model.hparams["backbone"]["name"] == cfg.backbone.name
        if "num_classes" in model.hparams:  # linked, as selfsup fit links the DataModule's
            assert model.hparams["num_classes"] == 10


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: selfsup.methods.SimCLR\n  init_args:\n    tempreature: 0.1\n")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(bad)])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="rooot"):
        build_parser().parse_args(["--data.rooot", "x"])


@pytest.mark.parametrize("method", ["simclr", "moco", "linear_probe", "finetune"])
def test_num_classes_is_linked_from_the_data_before_anything_is_decoded(
    method: str, image_folder: Path, tmp_path: Path
) -> None:
    """selfsup fit links data.num_classes into the module when both are built (a folder listing,
    nothing decoded yet), so heads exist from __init__ on; a user cannot set it apart from the data."""
    cli = SelfsupCLI(
        [
            "--config",
            str(CONFIGS / "trainer/cpu.yaml"),
            "--config",
            str(CONFIGS / f"{method}/cifar10.yaml"),
            "--model.init_args.backbone.name",
            "small_cnn",
            "--model.init_args.backbone.width",
            "8",
            "--data.root",
            str(image_folder),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.datamodule.train_set is None  # not decoded: the class count came from the listing
    assert cli.model.hparams.num_classes == 3
    head = cli.model.online.head if method in ("simclr", "moco") else cli.model.classifier.head
    (linear,) = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert linear.out_features == 3
