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
