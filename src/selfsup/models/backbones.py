"""Backbones by name: a small CNN, torchvision models and timm models.

Every backbone maps (B, 3, H, W) float images to (B, num_features) pooled features, exposes
``num_features`` and ``num_depths``, and ``forward(x, depth=k)`` / ``depth_features(k)`` give
the pooled output after layer ``k`` where the model has several (for probing at several
depths: -1 the last, -2 the one before). Names:

- ``small_cnn``; ``resnet18``, ``resnet50`` (torchvision's, with an optional CIFAR stem);
- ``torchvision:<arch>``: any torchvision classification model, e.g. ``torchvision:resnet34``,
  ``torchvision:mobilenet_v3_small``, ``torchvision:vit_b_16``. The ResNet family keeps its four
  layers as depths, the CIFAR stem and GroupNorm; other models give their pooled features only;
- ``timm:<name>``, with timm installed (``pip install selfsup[timm]``): any timm model, e.g.
  ``timm:resnet50``, ``timm:vit_small_patch16_224``; depths from timm's ``feature_info``.

Nothing is downloaded: every model starts from its random initialization, or from the weights
of a file (``weights``: a torchvision or timm state dict, a ``selfsup export`` file, a stage
checkpoint; see :mod:`selfsup.models.weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup import SelfsupError
from selfsup.config import COUNT, PlainData, check_ranges
from selfsup.console import say
from selfsup.distributed import world_size
from selfsup.models.weights import load_weights, renamed_layers

Norm = Literal["batch", "group"]


def _norm_layer(norm: Norm) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        # GroupNorm does not depend on the batch, so it also works at batch size 1.
        return lambda c: nn.GroupNorm(min(32, c // 4) or 1, c)
    raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")


def check_batch_norm_batch(model: nn.Module) -> None:
    """Raise a SelfsupError if ``model`` would train BatchNorm on a batch of one sample.

    BatchNorm normalizes each channel by the statistics of the batch; with one sample per device
    those are the sample's own (and a (1, C) input has none at all), so training diverges from
    evaluation or crashes deep inside torch. GroupNorm does not depend on the batch. A
    SyncBatchNorm across several processes still sees several samples and is allowed.
    """
    synced = world_size() > 1
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.training and not (synced and isinstance(m, nn.SyncBatchNorm)):
            raise SelfsupError(
                "BatchNorm cannot train on a batch of 1 sample per device (it would normalize each image "
                "by its own statistics): use GroupNorm, which does not depend on the batch "
                "(backbone norm: group, e.g. --model.init_args.backbone.norm group), or a per-device batch "
                "of at least 2"
            )


class Backbone(nn.Module):
    """A stem, a list of layers (ResNet's layer1..4) and global average pooling.

    Shapes: (B, 3, H, W) -> (B, num_features).
    """

    def __init__(self, stem: nn.Module, layers: list[nn.Module], num_features: int, name: str) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = num_features
        self.name = name
        # channels_last: about 1.4x faster convolutions on CPU (oneDNN) and the layout
        # tensor cores want on GPU; the state dict is unchanged.
        self.to(memory_format=torch.channels_last)
        self._register_load_state_dict_pre_hook(renamed_layers)

    @property
    def num_depths(self) -> int:
        return len(self.layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            check_batch_norm_batch(self)
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor, depth: int = -1) -> torch.Tensor:
        """Pooled features after layer ``depth`` (index into ``layers``; -1 the last): (B, F_depth)."""
        last = depth % len(self.layers)
        x = self._stem(x)
        for block in self.layers[: last + 1]:
            x = block(x)
        return self.pool(x).flatten(1)

    def depth_features(self, depth: int = -1) -> int:
        """Channels after layer ``depth`` (pooled feature size), read off its last normalization."""
        block = self.layers[depth]
        # _BatchNorm covers SyncBatchNorm too, which Lightning swaps in under sync_batchnorm.
        channels = [
            m.num_features if isinstance(m, _BatchNorm) else m.num_channels
            for m in block.modules()
            if isinstance(m, _BatchNorm | nn.GroupNorm)
        ]
        return channels[-1]


def _conv_block(c_in: int, c_out: int, stride: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        _norm_layer(norm)(c_out),
        nn.ReLU(inplace=True),
    )


def small_cnn(width: int = 32, norm: Norm = "batch") -> Backbone:
    """Six 3x3 conv layers in three groups (widths w, 2w, 4w), fast on a couple of CPU cores.

    Downsamples by 4 in total, so it works from 8-pixel patches to full images.
    """
    w = width
    stem = _conv_block(3, w, 1, norm)
    layers: list[nn.Module] = [
        _conv_block(w, w, 1, norm),
        nn.Sequential(_conv_block(w, 2 * w, 2, norm), _conv_block(2 * w, 2 * w, 1, norm)),
        nn.Sequential(_conv_block(2 * w, 4 * w, 2, norm), _conv_block(4 * w, 4 * w, 1, norm)),
    ]
    for m in [stem, *layers]:
        for conv in m.modules():
            if isinstance(conv, nn.Conv2d):
                # He init (as torchvision's ResNets): keeps activations at unit scale through
                # the ReLUs, so that even the random network gives usable features.
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return Backbone(stem, layers, 4 * w, "small_cnn")


def _resnet(arch: str, cifar_stem: bool, norm: Norm) -> Backbone:
    # weights=None: nothing is ever downloaded.
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=_norm_layer(norm))
    if cifar_stem:
        # 32-pixel images: a 3x3 stride-1 first conv and no max-pool keep spatial detail
        # (lightly #1419: SimCLR on CIFAR-10 lost ~10 points without this).
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone(stem, layers, net.fc.in_features, arch)


def _no_depths(name: str, depth: int) -> SelfsupError:
    return SelfsupError(
        f"backbone {name} gives its pooled features only, not depth {depth}: probe the last "
        "(features.depth -1), or use a ResNet (torchvision:resnet*) or a timm model "
        "for intermediate depths"
    )


class PooledBackbone(nn.Module):
    """A torchvision classifier without its last linear layer: (B, 3, H, W) -> (B, F), one depth.

    The classifier's last ``nn.Linear`` becomes the identity, so the features are what the
    model's own head would have read (pooled CNN features, a ViT's class token).
    """

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        last = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not last:
            raise SelfsupError(f"backbone {name} has no linear classifier to take off; choose another model")
        path, linear = last[-1]
        parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
        setattr(parent, path.rpartition(".")[2], nn.Identity())
        self.net = net
        self.num_features = linear.in_features
        self.num_depths = 1
        self.name = name

    def forward(self, x: torch.Tensor, depth: int = -1) -> torch.Tensor:
        if depth not in (-1, 0):
            raise _no_depths(self.name, depth)
        if self.training and x.shape[0] == 1:
            check_batch_norm_batch(self)
        return self.net(x)

    def depth_features(self, depth: int = -1) -> int:
        if depth not in (-1, 0):
            raise _no_depths(self.name, depth)
        return self.num_features


class TimmBackbone(nn.Module):
    """A timm model without its classifier (``timm.create_model(name, num_classes=0, **args)``).

    The last depth is the model's own pooled output (B, num_features); earlier depths, where
    timm reports them (``feature_info`` and ``forward_intermediates``), are average-pooled
    feature maps (B, C_k). Depth 0 is timm's first reported feature (often the stem).

    ``args`` are timm's keyword arguments of the model (``img_size``, ``patch_size``,
    ``global_pool``, ``depth``, ...), as :meth:`BackboneSpec.timm_args` gathers them; an export
    records them so that timm builds the same model again.
    """

    def __init__(self, model_name: str, args: dict[str, Any] | None = None) -> None:
        super().__init__()
        try:
            import timm  # optional extra: selfsup[timm]
        except ImportError:
            raise SelfsupError(f"backbone timm:{model_name} needs timm: pip install 'selfsup[timm]'") from None
        self.args = dict(args or {})
        try:
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **self.args)
        except RuntimeError as e:  # timm's "Unknown model"
            raise SelfsupError(f"timm has no model {model_name!r} ({e}); see timm.list_models()") from None
        except TypeError as e:  # an argument this model does not take
            raise SelfsupError(f"timm's {model_name} does not take {sorted(self.args)}: {e}") from None
        except AssertionError as e:  # timm checks its arguments with asserts (embed_dim % num_heads)
            raise SelfsupError(f"timm's {model_name} with {self.args}: {e}") from None
        # timm types its models as nn.Module, which declares neither num_features (every timm model
        # has it) nor forward_intermediates (most have it).
        self.num_features = int(cast(int, self.model.num_features))
        info = getattr(self.model, "feature_info", None) or []
        layered = hasattr(self.model, "forward_intermediates") and len(info) > 1
        self._channels = [int(f["num_chs"]) for f in info] if layered else [self.num_features]
        self.name = f"timm:{model_name}"

    @property
    def num_depths(self) -> int:
        return len(self._channels)

    def forward(self, x: torch.Tensor, depth: int = -1) -> torch.Tensor:
        s = depth % self.num_depths
        if self.training and x.shape[0] == 1:
            check_batch_norm_batch(self)
        if s == self.num_depths - 1:
            return self.model(x)
        intermediates = cast(Callable[..., list[torch.Tensor]], self.model.forward_intermediates)
        (maps,) = intermediates(x, indices=[s], intermediates_only=True)
        return maps.mean(dim=(2, 3))  # NCHW, also for ViTs (tokens reshaped to their grid)

    def depth_features(self, depth: int = -1) -> int:
        s = depth % self.num_depths
        return self.num_features if s == self.num_depths - 1 else self._channels[s]


def vision_transformer(backbone: nn.Module, method: str) -> Any:
    """The timm ``VisionTransformer`` inside ``backbone``, for methods that work on its tokens
    (MAE); a SelfsupError naming the backbone otherwise."""
    vit = None
    if isinstance(backbone, TimmBackbone):
        from timm.models.vision_transformer import VisionTransformer  # timm is there: it built the backbone

        vit = backbone.model if isinstance(backbone.model, VisionTransformer) else None
    if vit is None:
        name = getattr(backbone, "name", type(backbone).__name__)
        raise SelfsupError(
            f"{method} needs a timm vision transformer (backbone: timm:vit_*), not {name}; "
            "e.g. backbone {name: timm:vit_tiny_patch16_224, image_size: 32, patch_size: 4}"
        )
    return vit


BACKBONES = ("small_cnn", "resnet18", "resnet50", "torchvision:<arch>", "timm:<name>")
_RESNETS = ("resnet", "resnext", "wide_resnet")

#: Any backbone :func:`build_backbone` makes: each has ``num_features``, ``num_depths``,
#: ``depth_features(k)`` and ``forward(x, depth=k)``.
AnyBackbone = Backbone | PooledBackbone | TimmBackbone


def _torchvision(arch: str, cifar_stem: bool, norm: Norm) -> Backbone | PooledBackbone:
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise SelfsupError(
            f"torchvision has no classification model {arch!r}; see "
            "torchvision.models.list_models(module=torchvision.models)"
        )
    if arch.startswith(_RESNETS):
        return _resnet(arch, cifar_stem, norm)
    if cifar_stem or norm != "batch":
        raise SelfsupError(f"cifar_stem and norm group apply to small_cnn and ResNets, not torchvision:{arch}")
    return PooledBackbone(torchvision.models.get_model(arch, weights=None), f"torchvision:{arch}")


def build_backbone(
    name: str = "small_cnn",
    cifar_stem: bool = False,
    width: int = 32,
    norm: Norm = "batch",
    timm_args: dict[str, Any] | None = None,
) -> AnyBackbone:
    """Build a backbone by name (see the module docstring for the names).

    Args:
        name: ``small_cnn``, ``resnet18``, ``resnet50``, ``torchvision:<arch>`` or ``timm:<name>``.
        cifar_stem: ResNets only: 3x3 stride-1 first conv and no max-pool, for 32-pixel images.
        width: small_cnn only: channels of the first layer.
        norm: ``batch`` (BatchNorm) or ``group`` (GroupNorm; small_cnn and ResNets).
        timm_args: ``timm:<name>`` only: keyword arguments of ``timm.create_model``.
    """
    if timm_args and not name.startswith("timm:"):
        raise SelfsupError(
            f"image_size, patch_size, pool and timm_kwargs apply to timm models (timm:<name>), not {name}"
        )
    if name == "small_cnn":
        return small_cnn(width, norm)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, cifar_stem, norm)
    if name.startswith("torchvision:"):
        return _torchvision(name.removeprefix("torchvision:"), cifar_stem, norm)
    if name.startswith("timm:"):
        if cifar_stem or norm != "batch":
            raise SelfsupError(f"cifar_stem and norm group apply to small_cnn and ResNets, not {name}")
        return TimmBackbone(name.removeprefix("timm:"), timm_args)
    raise SelfsupError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")


@dataclass(frozen=True)
class BackboneSpec(PlainData):
    """Which backbone a stage builds, shared by every stage module as one typed argument.

    Plain data: modules store it in their hyperparameters as a dict (see
    :class:`selfsup.config.PlainData`). In a config: ``backbone: {name: resnet18, cifar_stem: true}``;
    on the command line ``--model.init_args.backbone.name resnet18``.

    Args: as :func:`build_backbone`, and
        weights: starting weights, a file (a torchvision or timm state dict, a ``selfsup export``
            file, a stage checkpoint); None: the random initialization. In a pipeline, also the
            name of an earlier stage, whose trained backbone the stage starts from.
        image_size / patch_size: a timm vision transformer's input side and patch side (timm's
            ``img_size``, ``patch_size``), e.g. 32 and 4 for CIFAR (64 tokens), 64 and 8 for
            Imagenette at 64 px; None: the model's own (224 and 16 for ``vit_*_patch16_224``).
            Either one also lets the model take other input sizes (timm's ``dynamic_img_size``:
            the position embedding is interpolated), as DINO's smaller local crops need.
        pool: the features a timm vision transformer gives the probes and the heads: ``token``
            (the class token, as DINO reads it) or ``avg`` (the mean of the patch tokens, as MAE
            fine-tunes); None: the model's own (the class token for ViTs).
        timm_kwargs: more ``timm.create_model`` arguments, e.g. ``{depth: 6, drop_path_rate: 0.1}``.
    """

    name: str = "small_cnn"
    cifar_stem: bool = False
    width: int = 32
    norm: Norm = "batch"
    weights: str | None = None
    image_size: int | None = None
    patch_size: int | None = None
    pool: Literal["token", "avg"] | None = None
    timm_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_ranges(
            "model.init_args.backbone",
            {
                "width": (self.width, COUNT),
                "image_size": (self.image_size, COUNT),
                "patch_size": (self.patch_size, COUNT),
            },
        )
        if self.image_size and self.patch_size and self.image_size % self.patch_size:
            raise SelfsupError(
                f"backbone.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}: "
                "the patches must tile the image"
            )

    def timm_args(self) -> dict[str, Any]:
        """The keyword arguments ``timm.create_model`` takes for this backbone (besides
        ``num_classes=0``): what an export's card records."""
        args: dict[str, Any] = {}
        if self.image_size is not None:
            args["img_size"] = self.image_size
        if self.patch_size is not None:
            args["patch_size"] = self.patch_size
        if args:
            args["dynamic_img_size"] = True
        if self.pool is not None:
            args["global_pool"] = self.pool
        return args | dict(self.timm_kwargs or {})

    def build(self) -> AnyBackbone:
        """The backbone, with its starting weights loaded strictly where ``weights`` names a file."""
        backbone = build_backbone(self.name, self.cifar_stem, self.width, self.norm, self.timm_args())
        if self.weights:
            loaded = load_weights(backbone, self.weights)
            say(f"backbone: {self.name} starts from {self.weights} ({loaded.tensors} tensors, {loaded.layout})")
        return backbone

    def random(self) -> BackboneSpec:
        """The same architecture without starting weights."""
        return replace(self, weights=None)

    @classmethod
    def of(cls, value: Any, default: BackboneSpec | None = None) -> BackboneSpec:
        """As :meth:`PlainData.of`; a string is a backbone name."""
        return cls(name=value) if isinstance(value, str) else super().of(value, default)
