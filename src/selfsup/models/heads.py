"""Heads: a small MLP builder used for the projection head, the pair classifier and probes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

InitKind = Literal["uniform", "normal"]


def init_linear(layer: nn.Linear, init: InitKind = "normal", scale: float | None = None) -> None:
    """Draw weights near zero and set biases to zero.

    Args:
        init: ``"normal"`` draws N(0, scale^2); ``"uniform"`` draws U(-scale, scale).
        scale: None means 1/sqrt(fan_in) (LeCun), which keeps activations of unit scale.
    """
    s = 1.0 / math.sqrt(layer.in_features) if scale is None else scale
    with torch.no_grad():
        if init == "normal":
            layer.weight.normal_(0.0, s)
        elif init == "uniform":
            layer.weight.uniform_(-s, s)
        else:
            raise ValueError(f"init must be 'uniform' or 'normal', got {init!r}")
        if layer.bias is not None:
            layer.bias.zero_()


class MLP(nn.Sequential):
    """Fully connected layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    Hidden layers are Linear -> [BatchNorm1d] -> ReLU -> [Dropout]; the last layer is a
    plain Linear. ``MLP([3, 4, 4, 1])`` has (12+4) + (16+4) + (4+1) = 41 parameters.

    Args:
        sizes: layer widths, at least two.
        init / init_scale: weight initialization, see :func:`init_linear`.
        batch_norm: BatchNorm1d after each hidden Linear (its bias is then dropped).
        dropout: dropout probability after each hidden activation.

    Shapes: (B, sizes[0]) -> (B, sizes[-1]).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        init: InitKind = "normal",
        init_scale: float | None = None,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == len(sizes) - 2
            linear = nn.Linear(d_in, d_out, bias=last or not batch_norm)
            init_linear(linear, init, init_scale)
            layers.append(linear)
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.ReLU(inplace=True))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.sizes = list(sizes)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, section 3.1 and App. "Projection head"): a
    3-layer MLP with GELU (hidden 2048), a bottleneck of 256, L2 normalisation, then a
    weight-normalised linear layer without bias to the K output dimensions.

    With ``norm_last_layer`` the last layer's direction norms are fixed at 1 (weight norm with
    a frozen gain), which the paper finds steadier for ViT-S; without it the gain is learnt.
    Weights: truncated normal (std 0.02), as in the paper's code.

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        # torch.nn.utils.parametrizations.weight_norm: weight = g * v / ||v|| per output unit.
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
