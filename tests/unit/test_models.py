"""Backbones and the MLP head builder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup import SelfsupError
from selfsup.models import MLP, build_backbone


def test_mlp_parameter_count() -> None:
    mlp = MLP([3, 4, 4, 1])
    counts = [p.numel() for p in mlp.parameters()]
    assert counts == [12, 4, 16, 4, 4, 1]
    assert sum(counts) == 41
    assert mlp(torch.randn(5, 3)).shape == (5, 1)


@pytest.mark.parametrize("init", ["uniform", "normal"])
def test_mlp_init_near_zero_with_given_scale(init: str) -> None:
    torch.manual_seed(0)
    mlp = MLP([256, 512, 10], init=init, init_scale=0.01)
    w = mlp[0].weight
    assert (mlp[0].bias == 0).all()
    if init == "uniform":
        assert w.abs().max() <= 0.01 and w.abs().max() > 0.009
        assert w.std().item() == pytest.approx(0.01 / 3**0.5, rel=0.05)
    else:
        assert w.std().item() == pytest.approx(0.01, rel=0.05)
    default = MLP([256, 10])[0].weight.std().item()
    assert default == pytest.approx(1 / 16, rel=0.1)  # 1/sqrt(fan_in)
    with pytest.raises(ValueError):
        MLP([3, 1], init="xavier")  # type: ignore[arg-type]


def test_mlp_options() -> None:
    mlp = MLP([8, 16, 2], batch_norm=True, dropout=0.5)
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert mlp[0].bias is None  # BN follows: its shift replaces the bias
    with pytest.raises(ValueError):
        MLP([4])


@pytest.mark.parametrize(
    ("name", "kwargs", "features"),
    [("small_cnn", {"width": 8}, 32), ("resnet18", {"cifar_stem": True}, 512), ("resnet50", {}, 2048)],
)
def test_backbones_expose_feature_size(name: str, kwargs: dict, features: int) -> None:
    net = build_backbone(name, **kwargs)
    assert net.num_features == features
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, features)
    x = net.stem(torch.randn(1, 3, 32, 32))
    for layer in net.layers:  # the feature maps after each stage, shallow to deep
        x = layer(x)
    assert x.shape[1] == features


def test_cifar_stem_keeps_resolution() -> None:
    plain = build_backbone("resnet18")
    cifar = build_backbone("resnet18", cifar_stem=True)
    x = torch.randn(1, 3, 32, 32)
    assert cifar.stem(x).shape[-1] == 32  # 3x3 stride-1 conv, no max-pool
    assert plain.stem(x).shape[-1] == 8  # 7x7 stride-2 conv and max-pool
    assert cifar.stem[0].kernel_size == (3, 3)


def test_group_norm_trains_at_batch_one_and_batch_norm_cannot() -> None:
    gn = build_backbone("small_cnn", width=8, norm="group")
    gn.train()
    gn(torch.randn(1, 3, 16, 16)).sum().backward()
    for name in ("resnet18", "small_cnn"):  # resnet18 would crash in torch; small_cnn would train wrongly
        bn = build_backbone(name, width=8)
        bn.train()
        with pytest.raises(SelfsupError, match="GroupNorm.*norm: group"):
            bn(torch.randn(1, 3, 32, 32))
        bn.eval()
        assert bn(torch.randn(1, 3, 32, 32)).shape[0] == 1  # inference at batch 1 is fine
        bn.train()
        assert bn(torch.randn(2, 3, 32, 32)).shape[0] == 2


def test_unknown_backbone() -> None:
    with pytest.raises(SelfsupError, match="unknown backbone"):
        build_backbone("vgg")
    with pytest.raises(SelfsupError, match="torchvision has no classification model 'nope'"):
        build_backbone("torchvision:nope")
    with pytest.raises(SelfsupError, match="timm has no model 'nope'"):
        build_backbone("timm:nope")
    with pytest.raises(SelfsupError, match="not torchvision:mobilenet_v3_small"):
        build_backbone("torchvision:mobilenet_v3_small", cifar_stem=True)


@pytest.mark.parametrize(
    "name, features, depths",
    [
        ("torchvision:resnet34", 512, [64, 128, 256, 512]),  # the ResNet family keeps its layers
        ("torchvision:mobilenet_v3_small", 1024, [1024]),  # pooled features only
        ("timm:resnet18", 512, [64, 64, 128, 256, 512]),  # timm's feature_info: stem, then 4 layers
    ],
)
def test_named_backbones_give_pooled_features_at_each_depth(name: str, features: int, depths: list[int]) -> None:
    net = build_backbone(name).eval()
    x = torch.randn(2, 3, 32, 32)
    assert net.num_features == features and net.num_depths == len(depths)
    with torch.no_grad():
        assert net(x).shape == (2, features)
        for k, c in enumerate(depths):
            assert net.depth_features(k) == c and net(x, depth=k).shape == (2, c)
    if len(depths) == 1:
        with pytest.raises(SelfsupError, match="pooled features only, not depth -2"):
            net(x, depth=-2)


def test_sync_batch_norm_backbone() -> None:
    """What Lightning's sync_batchnorm does to a backbone: feature sizes still read, and a
    batch of 1 still refused when there is no other process to share statistics with."""
    bn = build_backbone("small_cnn", width=8)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    assert [sync.depth_features(k) for k in range(len(sync.layers))] == [8, 16, 32]
    sync.train()
    with pytest.raises(SelfsupError, match="GroupNorm"):
        sync(torch.randn(1, 3, 32, 32))


def test_weights_saved_before_the_layers_were_renamed_still_load() -> None:
    """Checkpoints of selfsup before 0.2 name a backbone's layers ``stages.<k>``: they load
    strictly into ``layers.<k>``, with the same values."""
    net = build_backbone("small_cnn", width=8)
    old = {k.replace("layers.", "stages.", 1): v.clone() + 1 for k, v in net.state_dict().items()}
    assert any(k.startswith("stages.") for k in old)
    fresh = build_backbone("small_cnn", width=8)
    fresh.load_state_dict(old, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, old[k.replace("layers.", "stages.", 1)]), k
