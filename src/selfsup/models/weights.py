"""Starting weights for a backbone, loaded strictly from the files people have.

Accepted (all read with ``weights_only=True``, so a file cannot run code):

- a torchvision or timm state dict as people save them (``torch.save(model.state_dict(), f)``),
  with or without the classifier: ``fc.*``, ``head.*``, ``heads.*`` and ``classifier.*`` keys
  that the backbone does not have are left out and named in one line;
- a ``selfsup export`` file of any format (torchvision, timm, plain);
- a selfsup stage checkpoint (its ``backbone.*`` weights; a distillation's student);
- any of these saved from a DDP-wrapped model (``module.`` before every key).

Every other mismatch (a missing, unexpected or mis-shaped key) stops with one line naming them,
so that a backbone never trains from silently random weights (mmselfsup #330).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup import SelfsupError
from selfsup.console import say

#: Keys of a classifier on top of the features: left out when the backbone has no such key.
CLASSIFIER_PREFIXES = ("fc.", "head.", "heads.", "classifier.")

State = dict[str, torch.Tensor]


def renamed_layers(state_dict: dict[str, Any], prefix: str = "", *args: Any) -> None:
    """Checkpoints written before selfsup 0.2 call a backbone's layers ``stages.<k>``: rename those
    keys (under ``prefix``) to ``layers.<k>``, in place, so that they load (a load_state_dict pre-hook)."""
    old = prefix + "stages."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "layers." + key[len(old) :]] = state_dict.pop(key)


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_weights` loaded: the tensor count, the file's layout and the classifier keys left out."""

    tensors: int
    layout: str
    ignored: tuple[str, ...]


def load_safely(path: str | Path, noun: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is not a torch file, or one
    holding arbitrary objects (pickled classes, which are never run), stops in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SelfsupError(f"{noun} not found: {path}") from None
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's weights-only refusal is a paragraph; its reason is the line that names the object.
        why = next((ln.partition(":")[2].strip() for ln in lines if ln.startswith("WeightsUnpickler error")), "")
        found = re.search(r"GLOBAL (\S+) was not an allowed global", why)
        if found:
            why = f"it holds a {found.group(1)} object, not tensors only"
        why = why or (lines[0] if lines else type(e).__name__)
        raise SelfsupError(
            f"not a {noun} selfsup can read safely: {path} ({why[:200]}); nothing in it was run. A weights "
            "file must hold tensors only: torch.save(model.state_dict(), f), not a whole model"
        ) from None


def read_state(path: str | Path, noun: str = "weights file") -> tuple[State, str]:
    """The tensors of a weights file and what it is (``checkpoint`` or ``state dict``); errors call
    the file ``noun``.

    A stage checkpoint gives its ``backbone.*`` weights without the prefix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SelfsupError(f"{noun} not found: {path}")
    obj = load_safely(path, noun)
    if not isinstance(obj, dict):
        raise SelfsupError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint: the stage's backbone
        state = {k[len("backbone.") :]: v for k, v in obj["state_dict"].items() if k.startswith("backbone.")}
        if not state:
            some = ", ".join(list(obj["state_dict"])[:4]) or "none"
            raise SelfsupError(f"{path} holds no 'backbone.*' weights (its first keys: {some})")
        renamed_layers(state)
        return state, "checkpoint"
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise SelfsupError(f"{path} holds no tensors (its keys: {', '.join(map(str, list(obj)[:4])) or 'none'})")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    renamed_layers(state)
    return state, "state dict"


def _resnet_layout(state: State) -> State:
    """torchvision's and timm's ResNet names (conv1, bn1, layer1..4) -> selfsup's (stem.0, stem.1, layers.0..3)."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in ("conv1", "bn1"):
            key = {"conv1": "stem.0", "bn1": "stem.1"}[head] + "." + rest
        elif head.startswith("layer") and head[5:].isdigit():
            key = f"layers.{int(head[5:]) - 1}.{rest}"
        out[key] = value
    return out


#: The layouts a file may come in, as renamings into a selfsup backbone's keys.
LAYOUTS: dict[str, Callable[[State], State]] = {
    "selfsup": dict,
    "torchvision/timm ResNet": _resnet_layout,
    "torchvision": lambda s: {f"net.{k}": v for k, v in s.items()},
    "timm": lambda s: {f"model.{k}": v for k, v in s.items()},
}


def _show(keys: list[str]) -> str:
    return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"


def fit_vit_grid(backbone: nn.Module, state: State) -> list[str]:
    """Resample a timm ViT's position embeddings (``model.pos_embed``) and patch kernel
    (``model.patch_embed.proj.weight``) in ``state`` to the backbone's grid and patch size, as timm
    does when it loads weights made at another size: a ViT-S/16 trained at 224 px starts a ViT at
    32 px with 4-pixel patches. Returns what was resampled, in words; nothing for other backbones."""
    model = getattr(backbone, "model", None)
    own = backbone.state_dict()
    pos, kernel = "model.pos_embed", "model.patch_embed.proj.weight"
    if model is None or pos not in own or pos not in state or kernel not in state:
        return []
    from timm.layers import resample_abs_pos_embed, resample_patch_embed  # timm built the backbone

    done = []
    if state[kernel].shape[-2:] != own[kernel].shape[-2:] and state[kernel].shape[:2] == own[kernel].shape[:2]:
        state[kernel] = resample_patch_embed(state[kernel], list(own[kernel].shape[-2:]))
        done.append(f"patch kernel {tuple(state[kernel].shape[-2:])}")
    if state[pos].shape[1] != own[pos].shape[1] and state[pos].shape[2] == own[pos].shape[2]:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        state[pos] = resample_abs_pos_embed(state[pos], list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
        done.append(f"position embeddings to a {model.patch_embed.grid_size[0]}x{model.patch_embed.grid_size[1]} grid")
    return done


def load_weights(backbone: nn.Module, path: str | Path, noun: str = "weights file") -> Loaded:
    """Load the weights in ``path`` into ``backbone`` strictly (see the module docstring).

    The file's layout is the one whose key names match the backbone's best; classifier keys the
    backbone lacks are left out and named; anything else that does not match is one error line."""
    state, kind = read_state(path, noun)
    own = backbone.state_dict()
    layout, mapped = max(
        ((name, rename(state)) for name, rename in LAYOUTS.items()), key=lambda lm: len(own.keys() & lm[1].keys())
    )
    # The classifier's keys, in the file's own names (fc.weight, head.bias, heads.head.weight).
    original = dict(zip(mapped, state, strict=True))
    ignored = sorted(original[k] for k in mapped if k not in own and original[k].startswith(CLASSIFIER_PREFIXES))
    sub = {k: v for k, v in mapped.items() if original[k] not in ignored}
    resampled = fit_vit_grid(backbone, sub)
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(original[k] for k in set(sub) - set(own))
    shapes = sorted(
        f"{original[k]} {tuple(sub[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(sub)
        if own[k].shape != sub[k].shape
    )
    if missing or unexpected or shapes:
        raise SelfsupError(
            f"the weights in {path} do not fit the backbone ({getattr(backbone, 'name', type(backbone).__name__)}): "
            f"missing keys {_show(missing)}, unexpected keys {_show(unexpected)}, shape mismatches {_show(shapes)}; "
            "check the backbone's name, cifar_stem, width and norm against the model the weights come from"
        )
    backbone.load_state_dict(sub, strict=True)
    if resampled:
        say(f"weights: resampled the ViT's {' and '.join(resampled)} of {path} (as timm does)")
    if ignored:
        say(f"weights: left out the classifier of {path}: {', '.join(ignored)}")
    return Loaded(len(sub), f"{layout} {kind}" if kind == "state dict" else kind, tuple(ignored))


def load_backbone(backbone: nn.Module, path: str | Path) -> int:
    """Load a stage checkpoint's (or any weights file's) backbone strictly; return the tensor count."""
    return load_weights(backbone, path, "checkpoint").tensors
