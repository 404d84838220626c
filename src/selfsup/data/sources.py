"""Images that come ready-made: the embedded CIFAR-10 sample and torchvision's CIFAR-10/100 and
STL-10 files, decoded to :class:`~selfsup.data.splits.ImageSet` uint8 tensors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from selfsup import SelfsupError
from selfsup.data.decode import decode_files, is_image_name
from selfsup.data.splits import ImageSet

SAMPLE_ZIP = Path(__file__).parent / "sample" / "cifar10_sample.zip"


#: Classes of the torchvision sets ``ImageDataModule`` reads, known without reading them.
TORCHVISION_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}


def _sample_names(zf: zipfile.ZipFile, split: str) -> tuple[list[str], list[str]]:
    names = sorted(n for n in zf.namelist() if n.startswith(f"{split}/") and is_image_name(n.rsplit("/", 1)[-1]))
    return names, sorted({n.split("/")[1] for n in names})


def sample_classes() -> list[str]:
    """Class names of the embedded sample, from its file list (nothing decoded)."""
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        return _sample_names(zf, "train")[1]


def load_sample_split(split: str, image_size: int | None) -> ImageSet:
    """Decode one split (``train`` or ``val``) of the embedded CIFAR-10 sample."""
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names, classes = _sample_names(zf, split)
        blobs = [zf.read(n) for n in names]
    labels = torch.tensor([classes.index(n.split("/")[1]) for n in names], dtype=torch.long)
    d = decode_files(blobs, image_size if image_size is not None else 32, workers=1)
    return ImageSet(torch.from_numpy(d.images), labels, classes)


def load_torchvision_split(name: str, root: str, train: bool, download: bool, image_size: int | None) -> ImageSet:
    """CIFAR-10, CIFAR-100 or STL-10 (train/test) from torchvision's files under ``root``."""
    try:
        if name == "cifar10":
            ds = tvd.CIFAR10(root, train=train, download=download)
        elif name == "cifar100":
            ds = tvd.CIFAR100(root, train=train, download=download)
        elif name == "stl10":
            ds = tvd.STL10(root, split="train" if train else "test", download=download)
        else:
            raise SelfsupError(f"unknown torchvision dataset {name!r}")
    except RuntimeError as e:
        raise SelfsupError(
            f"{name} files not found under {root} ({e}); put torchvision's {name} files there, "
            "or set data.download=true on a machine with internet"
        ) from None
    if name == "stl10":
        images = torch.from_numpy(np.asarray(ds.data))  # (N, 3, 96, 96)
        labels = torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)
    else:
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) on disk
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    if image_size is not None and images.shape[-1] != image_size:
        images = (
            torch.nn.functional.interpolate(
                images.float(), size=(image_size, image_size), mode="bilinear", antialias=True
            )
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
        )
    return ImageSet(images, labels, list(ds.classes))
