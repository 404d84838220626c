"""Pieces the stage modules share: optimiser set-up, backbone hand-off."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from selfsup import SelfsupError
from selfsup.optim.lars import LARS

OptimizerName = Literal["adam", "adamw", "sgd", "lars"]


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Split parameters so that biases and normalisation weights (1-d tensors) get no weight
    decay, as in SimCLR and Goyal et al. (2017)."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        # LARS leaves these out of its trust-ratio adaptation too (SimCLR).
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def build_optimizer(
    groups: list[dict], name: OptimizerName, lr: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    if name != "lars":
        # Only LARS knows the exclusion flag.
        groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise SelfsupError(f"unknown optimizer {name!r}; choose adam, adamw, sgd or lars")


def configure_optimizers(module, modules: Iterable[nn.Module], extra_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """Optimiser for ``modules`` from the module's hyperparameters ``optimizer``, ``lr``,
    ``weight_decay`` and ``momentum``; ``extra_groups`` (e.g. an online probe with its own
    ``lr``) join the same optimiser.

    ``lr`` is the base rate at the reference batch: the LearningRateScaling and Warmup
    callbacks (selfsup.callbacks) set the rate of every step from it and the trainer's facts.
    """
    hp = module.hparams
    groups = param_groups(modules, hp.weight_decay) + list(extra_groups or [])
    return build_optimizer(groups, hp.optimizer, hp.lr, hp.momentum)


def load_backbone(backbone: nn.Module, path: str | Path) -> int:
    """Load ``backbone.*`` weights from a stage checkpoint strictly; return the tensor count.

    Raises a SelfsupError naming missing and unexpected keys, so that a mismatch never
    leaves a silently random backbone (mmselfsup #330).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SelfsupError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding arbitrary objects
        raise SelfsupError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not sub:
        some = ", ".join(list(state)[:4]) or "none"
        raise SelfsupError(f"{path} holds no 'backbone.*' weights (its first keys: {some})")
    own = backbone.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    shapes = [k for k in set(own) & set(sub) if own[k].shape != sub[k].shape]
    if missing or unexpected or shapes:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

        raise SelfsupError(
            f"backbone weights in {path} do not match the configured backbone: missing keys {show(missing)}, "
            f"unexpected keys {show(unexpected)}, shape mismatches {show(sorted(shapes))}; "
            "check the backbone (name, width, cifar_stem, norm) against the pretraining run"
        )
    backbone.load_state_dict(sub, strict=True)
    return len(sub)
