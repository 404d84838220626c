"""Loading a backbone's weights from a file, strictly: a mismatch is one line naming the keys."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from selfsup import SelfsupError
from selfsup.models.backbones import renamed_layers


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
    sub = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    renamed_layers(sub)
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
