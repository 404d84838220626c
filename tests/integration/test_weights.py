"""Starting weights (backbone.weights): the files people have load strictly and give the source model's features."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision

from selfsup import SelfsupError
from selfsup.export import export_backbone
from selfsup.models import BackboneSpec

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A model whose weights and BatchNorm statistics differ from any fresh initialization, as trained ones do."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():  # a change of scale keeps BatchNorm's variances positive
                t.mul_(1 + 0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (channels-last convolutions sum in another order)."""
    return bool((a - b).norm() <= 1e-5 * b.norm())


def features_of(spec: BackboneSpec) -> torch.Tensor:
    with torch.no_grad():
        return spec.build().eval()(X)


def test_torchvision_state_dict_with_classifier_loads_into_resnet18(tmp_path: Path, capsys) -> None:
    source = perturbed(torchvision.models.resnet18())
    f = tmp_path / "tv.pt"
    torch.save(source.state_dict(), f)
    source.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = source(X)
    got = features_of(BackboneSpec(name="resnet18", weights=str(f)))
    assert close(got, expected)
    assert not torch.allclose(features_of(BackboneSpec(name="resnet18")), expected, rtol=1e-2)
    out = capsys.readouterr().out
    assert "left out the classifier" in out and "fc.bias, fc.weight" in out  # named, in one line


def test_torchvision_resnet50_and_timm_resnet_and_ddp_prefix(tmp_path: Path) -> None:
    source = perturbed(torchvision.models.resnet50())
    f = tmp_path / "r50.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, f)  # saved from a DDP-wrapped model
    source.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = source(X)
    assert close(features_of(BackboneSpec(name="torchvision:resnet50", weights=str(f))), expected)
    # timm's ResNet-18 names its layers as torchvision does: it loads into selfsup's resnet18 too.
    tm = perturbed(timm.create_model("resnet18", pretrained=False))
    f2 = tmp_path / "timm_r18.pt"
    torch.save(tm.state_dict(), f2)
    with torch.no_grad():
        expected = tm.forward_head(tm.forward_features(X), pre_logits=True)
    assert close(features_of(BackboneSpec(name="resnet18", weights=str(f2))), expected)


def test_timm_vit_state_dict_loads_with_its_head_left_out(tmp_path: Path, capsys) -> None:
    name = "vit_tiny_patch16_224"
    source = perturbed(timm.create_model(name, pretrained=False, num_classes=10))
    f = tmp_path / "vit.pt"
    torch.save(source.state_dict(), f)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        got = BackboneSpec(name=f"timm:{name}", weights=str(f)).build().eval()(x)
    assert close(got, expected)
    out = capsys.readouterr().out
    assert "head.bias, head.weight" in out and "timm state dict" in out


def test_torchvision_non_resnet_loads_into_its_pooled_backbone(tmp_path: Path) -> None:
    source = perturbed(torchvision.models.mobilenet_v3_small())
    f = tmp_path / "mnv3.pt"
    torch.save(source.state_dict(), f)
    source.classifier[3] = torch.nn.Identity()  # what the pooled backbone takes off: the last linear layer
    with torch.no_grad():
        expected = source(X)
    got = features_of(BackboneSpec(name="torchvision:mobilenet_v3_small", weights=str(f)))
    assert close(got, expected)


def test_wrong_architecture_is_one_line_naming_the_keys(tmp_path: Path) -> None:
    f = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), f)
    with pytest.raises(SelfsupError) as e:
        BackboneSpec(name="resnet18", weights=str(f)).build()
    msg = str(e.value)
    assert "\n" not in msg and "missing keys" in msg and "unexpected keys" in msg and "shape mismatches" in msg
    assert (
        "layer1.0.bn3.bias" in msg and "layer1.0.conv1.weight (64, 64, 1, 1)" in msg
    )  # ResNet-50 keys the ResNet-18 lacks, in the file's own name
    # The CIFAR stem is another architecture: its 3x3 first conv cannot take the 7x7 one.
    f18 = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), f18)
    with pytest.raises(SelfsupError, match=r"shape mismatches 1 \(conv1.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)\)"):
        BackboneSpec(name="resnet18", cifar_stem=True, weights=str(f18)).build()
    # A pickled model (not a state dict) is refused by weights_only loading, in one line.
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(), whole)
    with pytest.raises(
        SelfsupError,
        match="not a weights file selfsup can read safely: .*torchvision.models.resnet.ResNet object.*not a whole",
    ):
        BackboneSpec(name="resnet18", weights=str(whole)).build()
    with pytest.raises(SelfsupError, match="weights file not found"):
        BackboneSpec(name="resnet18", weights=str(tmp_path / "nothing.pt")).build()


def test_export_round_trips_into_a_new_stage(tmp_path: Path) -> None:
    """A stage checkpoint's backbone, exported in each format, starts a new stage with the same features."""
    from test_export import pretrain  # one real SimCLR step through selfsup fit

    from conftest import write_image_folder

    images = write_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    arch = ["--model.init_args.backbone.name", "resnet18", "--model.init_args.backbone.cifar_stem", "false"]
    ckpt = pretrain(images, tmp_path / "run", *arch)
    trained = features_of(BackboneSpec(name="resnet18", weights=str(ckpt)))  # the checkpoint itself
    assert not torch.allclose(trained, features_of(BackboneSpec(name="resnet18")), rtol=1e-2)
    for fmt in ("torchvision", "timm", "plain"):
        export_backbone(ckpt, tmp_path / f"{fmt}.pt", fmt)
        again = features_of(BackboneSpec(name="resnet18", weights=str(tmp_path / f"{fmt}.pt")))
        assert close(again, trained), fmt
