"""``selfsup export``: a stage checkpoint's backbone as weights that torchvision or timm load.

    selfsup export --ckpt runs/simclr/checkpoints/last.ckpt --out resnet18_simclr.pt --format torchvision
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(torch.load("resnet18_simclr.pt"), strict=False)
    # missing: the classifier (fc.weight, fc.bias) only; unexpected: none

Formats: ``torchvision`` (the ResNets selfsup builds, and any ``torchvision:<arch>`` backbone),
``timm`` (ResNets, whose key names timm shares, and any ``timm:<name>`` backbone) and ``plain``
(the backbone's own state dict, ``selfsup.models.build_backbone`` loads it; every backbone).
Each export is checked by loading it into the target model before it is written, and a JSON
beside it (``FILE.json``) says what it is: method, data, epochs, metrics, config.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from jsonargparse import ArgumentParser
from torch import nn

from selfsup import SelfsupError
from selfsup.config import ConfigErrorMixin
from selfsup.files import write_atomic
from selfsup.models.backbones import BackboneSpec
from selfsup.models.weights import load_backbone, load_safely

Format = Literal["torchvision", "timm", "plain"]
FORMATS = ("torchvision", "timm", "plain")


def _resnet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """selfsup's ResNet layout (stem.0 conv1, stem.1 bn1, layers.i layer{i+1}) -> torchvision's names."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "stem":
            index, _, rest = rest.partition(".")
            out[{"0": "conv1", "1": "bn1"}[index] + "." + rest] = value
        elif head == "layers":
            index, _, rest = rest.partition(".")
            out[f"layer{int(index) + 1}.{rest}"] = value
        else:
            raise SelfsupError(f"unexpected key {key} in a ResNet backbone")
    return out


def convert(spec: BackboneSpec, state: dict[str, torch.Tensor], fmt: Format) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's state dict in ``fmt``, and the architecture name to build there.

    Raises a SelfsupError naming why a backbone has no counterpart in that library."""
    name = spec.name
    if fmt == "plain":
        return dict(state), name
    arch = name.split(":", 1)[-1]
    resnet = name in ("resnet18", "resnet50") or (
        name.startswith("torchvision:") and "layers.0.0.conv1.weight" in state
    )
    if name == "small_cnn":
        raise SelfsupError(
            "the small CNN is selfsup's own: neither torchvision nor timm has it; "
            "export it with --format plain (selfsup.models.build_backbone loads it)"
        )
    if resnet and spec.cifar_stem:
        raise SelfsupError(
            f"this {arch} has the CIFAR stem (a 3x3 stride-1 first conv, no max-pool), which "
            f"{fmt}'s {arch} does not have: its weights would not fit; export with --format plain, "
            "or pretrain without backbone.cifar_stem for a torchvision/timm model"
        )
    if spec.norm != "batch":
        raise SelfsupError(f"this backbone uses GroupNorm, {fmt}'s {arch} BatchNorm: export with --format plain")
    if resnet:
        return _resnet_keys(state), arch
    if name.startswith("torchvision:") and fmt == "torchvision":
        return {k.removeprefix("net."): v for k, v in state.items()}, arch
    if name.startswith("timm:") and fmt == "timm":
        return {k.removeprefix("model."): v for k, v in state.items()}, arch
    other = "timm" if fmt == "torchvision" else "torchvision"
    raise SelfsupError(f"backbone {name} comes from {other}: export it with --format {other} (or plain)")


def target_model(fmt: Format, arch: str, timm_args: dict[str, Any] | None = None) -> nn.Module:
    """The library's model the export is for, at its random initialization (nothing downloaded);
    a timm model with the keyword arguments the backbone was built with (image and patch size)."""
    if fmt == "torchvision":
        return torchvision.models.get_model(arch, weights=None)
    try:
        import timm  # optional extra: selfsup[timm]
    except ImportError:
        raise SelfsupError("--format timm needs timm: pip install 'selfsup[timm]'") from None
    return timm.create_model(arch, pretrained=False, **(timm_args or {}))


def check_loads(
    fmt: Format, arch: str, state: dict[str, torch.Tensor], timm_args: dict[str, Any] | None = None
) -> list[str]:
    """Load ``state`` into the target model; return the missing keys (the classifier's). Raises if
    anything but the classifier is missing or anything is left over."""
    model = target_model(fmt, arch, timm_args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = [k for k in missing if k.startswith(("fc.", "classifier.", "head.", "heads."))]
    if unexpected or len(head) != len(missing):
        raise SelfsupError(
            f"the {fmt} {arch} does not take these weights: missing {sorted(set(missing) - set(head))[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    return missing


def describe(ckpt_path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds: method, data, epochs, the run's last validation figures, config."""
    hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k != "_instantiator"}
    info: dict[str, Any] = {
        "source": str(ckpt_path.resolve()),
        "method": hp.pop("_class_path", None),
        "epochs": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "data": {k: ckpt.get("datamodule_hyper_parameters", {}).get(k) for k in ("root", "image_size", "labels")},
        "config": hp,
    }
    metrics_csv = ckpt_path.parent.parent / "metrics.csv"  # the run folder's, when there is one
    if metrics_csv.is_file():
        last: dict[str, float] = {}
        with metrics_csv.open() as f:
            for row in csv.DictReader(f):
                last.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v})
        info["metrics"] = last
    return info


def natural_format(spec: BackboneSpec) -> Format:
    """The library a backbone's weights naturally load into: timm for ``timm:*``, torchvision for
    its ResNets (without the CIFAR stem or GroupNorm) and ``torchvision:*``, else plain."""
    if spec.name.startswith("timm:"):
        return "timm"
    if spec.name.startswith("torchvision:") or spec.name in ("resnet18", "resnet50"):
        return "plain" if spec.cifar_stem or spec.norm != "batch" else "torchvision"
    return "plain"


def write_export(
    spec: BackboneSpec, backbone: nn.Module, out: str | Path, fmt: Format, info: dict[str, Any]
) -> dict[str, Any]:
    """Write ``backbone`` (built from ``spec``) as ``out`` in ``fmt``, checked by loading it into
    the target model, and ``out.json`` beside it (``info`` and what the file is); return that card."""
    out = Path(out)
    state, arch = convert(spec, backbone.state_dict(), fmt)
    timm_args = spec.timm_args() if fmt == "timm" else {}
    missing = check_loads(fmt, arch, state, timm_args) if fmt != "plain" else []
    write_atomic(out, partial(torch.save, state))
    card = {"format": fmt, "arch": arch, "backbone": spec.as_dict(), "missing_in_target": missing, **info}
    if timm_args:  # timm.create_model(card["arch"], **card["timm_args"]) builds the same model
        card["timm_args"] = timm_args
    write_atomic(out.with_name(out.name + ".json"), json.dumps(card, indent=2, default=str) + "\n")
    return card


def export_backbone(ckpt_path: str | Path, out: str | Path, fmt: Format) -> dict[str, Any]:
    """Write the backbone of a stage checkpoint as ``out`` in ``fmt`` and ``out.json`` beside it;
    return the description written there."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    if fmt not in FORMATS:
        raise SelfsupError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if not ckpt_path.is_file():
        raise SelfsupError(f"checkpoint not found: {ckpt_path}")
    ckpt = load_safely(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise SelfsupError(f"{ckpt_path} is not a selfsup stage checkpoint (it has no state_dict)")
    spec = BackboneSpec.of((ckpt.get("hyper_parameters") or {}).get("backbone"))
    # The checkpoint holds the trained weights: the starting ones it began from are not read again.
    backbone = spec.random().build()
    load_backbone(backbone, ckpt_path)  # strict: the checkpoint's backbone is the spec's
    return write_export(spec, backbone, out, fmt, describe(ckpt_path, ckpt))


class ExportParser(ConfigErrorMixin, ArgumentParser):
    """``selfsup export``'s parser; errors become one-line SelfsupErrors."""


def build_parser() -> ArgumentParser:
    p = ExportParser(prog="selfsup export", description=__doc__.splitlines()[0], default_meta=False)
    p.add_argument(
        "--ckpt", type=str, required=True, help="a stage checkpoint (e.g. runs/simclr/checkpoints/last.ckpt)"
    )
    p.add_argument(
        "--out", type=str, required=True, help="the file to write (a state dict); FILE.json is written beside it"
    )
    p.add_argument("--format", type=Format, default="torchvision", help="torchvision, timm or plain")
    return p


def export_main(argv: Sequence[str]) -> dict[str, Any]:
    a = build_parser().parse_args(list(argv))
    info = export_backbone(a.ckpt, a.out, a.format)
    loads = {
        "torchvision": f"torchvision.models.{info['arch']}()",
        "timm": f"timm.create_model({info['arch']!r}"
        + "".join(f", {k}={v!r}" for k, v in info.get("timm_args", {}).items())
        + ")",
        "plain": f"selfsup.models.build_backbone(**{info['backbone']})",
    }[a.format]
    print(
        f"export: {a.out} ({len(torch.load(a.out, weights_only=True))} tensors) loads into {loads}"
        + (f" with only {', '.join(info['missing_in_target'])} missing" if info["missing_in_target"] else "")
        + f"; what it is: {a.out}.json"
    )
    return info
