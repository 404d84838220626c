"""selfsup export: a checkpoint's backbone loads into torchvision and timm and computes the same features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from selfsup import SelfsupError
from selfsup.cli import SelfsupCLI
from selfsup.export import export_backbone
from selfsup.models import build_backbone

REPO = Path(__file__).resolve().parents[2]


def pretrain(images: Path, run_dir: Path, *backbone: str) -> Path:
    """One real SimCLR step through selfsup fit; the run folder's last.ckpt."""
    SelfsupCLI(
        [
            "fit",
            "--config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--config",
            str(REPO / "configs/simclr/cifar10.yaml"),
            *backbone,
            "--model.init_args.proj_hidden",
            "16",
            "--data.root",
            str(images),
            "--data.batch_size",
            "8",
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--checkpoint.every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(run_dir),
        ]
    )
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("export")
    images = write_image_folder(base / "images", {"train": 4, "val": 2})
    return pretrain(
        images,
        base / "run",
        "--model.init_args.backbone.name",
        "resnet18",
        "--model.init_args.backbone.cifar_stem",
        "false",
    )


def ours(ckpt: Path) -> torch.nn.Module:
    state = torch.load(ckpt, weights_only=True)
    model = build_backbone("resnet18")
    model.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
    )
    return model.eval()


def test_resnet18_export_loads_into_torchvision_and_timm_with_the_same_features(
    resnet_ckpt: Path, tmp_path: Path
) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(resnet_ckpt)(x)
    # The exported weights are the trained ones, not an initialization: they differ from a fresh model's.
    assert not torch.allclose(expected, build_backbone("resnet18").eval()(x), atol=1e-3)

    tv_file = tmp_path / "resnet18_tv.pt"
    export_backbone(resnet_ckpt, tv_file, "torchvision")
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(torch.load(tv_file, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    tv.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), expected, atol=1e-5)

    timm_file = tmp_path / "resnet18_timm.pt"
    export_backbone(resnet_ckpt, timm_file, "timm")
    tm = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = tm.load_state_dict(torch.load(timm_file, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    with torch.no_grad():
        assert torch.allclose(tm.eval().forward_head(tm.forward_features(x), pre_logits=True), expected, atol=1e-5)

    info = json.loads((tmp_path / "resnet18_tv.pt.json").read_text())
    assert info["method"] == "selfsup.methods.SimCLR" and info["format"] == "torchvision" and info["arch"] == "resnet18"
    assert info["global_step"] == 1 and info["config"]["backbone"]["name"] == "resnet18"
    assert info["data"]["image_size"] == 32


def test_backbones_without_a_counterpart_say_so_and_export_plain(image_folder: Path, tmp_path: Path) -> None:
    cifar = pretrain(
        image_folder, tmp_path / "cifar", "--model.init_args.backbone.name", "resnet18"
    )  # config: cifar_stem true
    with pytest.raises(SelfsupError, match="has the CIFAR stem .* export with --format plain"):
        export_backbone(cifar, tmp_path / "x.pt", "torchvision")
    small = pretrain(
        image_folder,
        tmp_path / "small",
        "--model.init_args.backbone.name",
        "small_cnn",
        "--model.init_args.backbone.width",
        "8",
    )
    with pytest.raises(SelfsupError, match="small CNN is selfsup's own"):
        export_backbone(small, tmp_path / "x.pt", "timm")
    # The command line: one line on success, one-line error otherwise.
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfsup.cli",
            "export",
            "--ckpt",
            str(small),
            "--out",
            str(tmp_path / "small.pt"),
            "--format",
            "plain",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "loads into selfsup.models.build_backbone" in p.stdout, p.stderr
    model = build_backbone("small_cnn", width=8)
    model.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True))  # strict: every key
    p = subprocess.run(
        [sys.executable, "-m", "selfsup.cli", "export", "--ckpt", str(cifar), "--out", str(tmp_path / "c.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.startswith("selfsup: error: this resnet18 has the CIFAR stem")
