"""Reference functions that only the tests use: the plain forms of what the package does batched
or fused, kept here so that the package holds only what it runs."""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.data.decode import _decode
from selfsup.data.litdata.samples import CenterImage, CropViews, decode_crops


def decode_image(path: str | Path | bytes, image_size: int | None) -> np.ndarray:
    """Decode one image to RGB uint8 (H, W, 3) as the decoding workers do; with ``image_size``
    the shorter side resized to it and a center square cut. Raises what Pillow raises."""
    return _decode(path, image_size)[0]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, hue as a fraction of a turn in [0, 1) (torchvision's)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    chroma = maxc - minc
    s = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    return torch.stack([torch.remainder(h / 6.0, 1.0), s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6,
    n = 5, 3, 1 for R, G, B (the closed form the hue shift uses)."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return (v - v * s * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)).clamp_(0.0, 1.0)


def decode_crop(data: bytes, box: tuple[float, float, float, float], size: int, flip: bool = False) -> torch.Tensor:
    """One crop ``box`` = (x0, y0, w, h) of an encoded image, resized to ``size`` and flipped
    with ``flip``: RGB uint8 (3, size, size), through the workers' :func:`decode_crops`."""
    return decode_crops(data, [box], size, [flip])[0]


def random_crops(
    data: bytes,
    height: int,
    width: int,
    n: int,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` random resized crops of one encoded image as the workers cut SimCLR's views."""
    return CropViews(n, size, tuple(scale), tuple(ratio), flip_p).cut(data, height, width, generator)


def streamed_images(directory: str | Path, image_size: int | None = None, shuffle: bool = False, seed: int = 0) -> Any:
    """A split written by ``selfsup data optimize`` read back as center squares with labels."""
    from selfsup.data.litdata.dataset import StreamedDataset  # litdata: an optional extra

    return StreamedDataset(str(directory), CenterImage(image_size), shuffle=shuffle, seed=seed)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_limit(n: int, m: int) -> float:
    """Critical KS distance at a significance level of 0.001."""
    return 1.95 * math.sqrt((n + m) / (n * m))


def free_port() -> int:
    """A port no process listens on now: DDP runs must not meet at a fixed MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_stacks(pgid: int, stacks: Path) -> str:
    """Every thread's stack in each process of group ``pgid`` whose Python registered
    ``faulthandler`` on SIGUSR2 into ``stacks`` (opened for appending; DataLoader workers
    forked from it inherit the handler and the file): one process at a time, each under a
    header naming it, so that a hung multi-process test says where each process waits."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # the stat fields after the name: state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    for pid in sorted(pids):
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[-160:]
            with stacks.open("a") as f:
                f.write(f"\n--- process {pid}: {cmd}\n")
            os.kill(pid, signal.SIGUSR2)
            time.sleep(0.5)
        except OSError:  # the process ended meanwhile
            continue
    return stacks.read_text() if stacks.exists() else "(no stacks written)"
