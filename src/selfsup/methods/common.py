"""Pieces the stage modules share: the optimiser argument, the backbone hand-off."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from selfsup import SelfsupError
from selfsup.config import PlainData
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


@dataclass(frozen=True)
class OptimizerSpec(PlainData):
    """The optimiser of a stage, one typed argument of every stage module (stored as a dict).

    ``lr`` is the base rate at the reference batch: the LearningRateScaling and Warmup callbacks
    (selfsup.callbacks) set the rate of every step from it and the trainer's facts. Biases and
    normalisation weights get no weight decay (and no LARS adaptation), as in SimCLR.

    Args:
        name: ``adam``, ``adamw``, ``sgd`` (Nesterov when momentum > 0) or ``lars``.
        lr: base learning rate at ``lr_scaling.reference_batch`` images per step.
        weight_decay: L2 penalty of the weights (not of 1-d parameters).
        momentum: of SGD and LARS.
    """

    name: OptimizerName = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9

    def build(self, modules: Iterable[nn.Module], extra_groups: Iterable[dict] = ()) -> torch.optim.Optimizer:
        """The optimiser over the trainable parameters of ``modules``; ``extra_groups`` (e.g. an
        online probe with its own ``lr``) join it."""
        groups = [g for g in param_groups(modules, self.weight_decay) + list(extra_groups) if g["params"]]
        if self.name != "lars":
            # Only LARS knows the exclusion flag.
            groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        if self.name == "lars":
            return LARS(groups, lr=self.lr, momentum=self.momentum)
        if self.name == "adam":
            return torch.optim.Adam(groups, lr=self.lr)
        if self.name == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr)
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        raise SelfsupError(f"unknown optimizer {self.name!r}; choose adam, adamw, sgd or lars")


def _plain_group(hint: Any) -> type[PlainData] | None:
    """The PlainData class in a type hint (``OptimizerSpec``, ``BackboneSpec | None``), if any."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, PlainData):
            return t
    return None


def save_plain_hyperparameters(module: L.LightningModule) -> None:
    """``module.save_hyperparameters()`` for the calling ``__init__``, with the typed argument
    groups (backbone, optimiser, ...; :class:`selfsup.config.PlainData`) stored as complete
    plain dicts, however they were given (a spec, a partial dict, a name, None), so that
    checkpoints load with ``torch.load(weights_only=True)`` and configs stay YAML."""
    module.save_hyperparameters(frame=inspect.currentframe().f_back)
    hints = typing.get_type_hints(type(module).__init__)
    # Both copies: the run config that loggers record is made from the initial ones.
    for hp in (module.hparams, module._hparams_initial):
        for key, value in hp.items():
            group = _plain_group(hints.get(key))
            if group is not None:
                hp[key] = group.of(value).as_dict()


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
