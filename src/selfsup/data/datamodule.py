"""The DataModule: decoded uint8 tensors in memory, fixed seeded splits, shuffled batches.

Batches are dicts: ``image`` uint8 (B, 3, H, W), ``label`` int64 (B,), ``index`` int64 (B,)
(the row of the image in its split, used e.g. to cache frozen features). Augmentation and
normalisation happen later, on the training device (see ``selfsup.data.views``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from selfsup import SelfsupError
from selfsup.data.sources import (
    EVAL_SPLITS,
    IMAGE_EXTENSIONS,
    ImageSet,
    default_cache_dir,
    load_folder_split,
    load_sample_split,
    load_torchvision_split,
)

Source = Literal["auto", "folder", "sample", "cifar10", "cifar100", "stl10"]


class TensorImageDataset(Dataset):
    """Map-style dataset over an :class:`ImageSet`; ``__getitems__`` fetches a whole batch by
    one tensor index instead of stacking B single items."""

    def __init__(self, images: ImageSet) -> None:
        self.set = images

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.set.images[i], "label": self.set.labels[i], "index": torch.tensor(i)}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"image": self.set.images[idx], "label": self.set.labels[idx], "index": idx}


def collate(batch: Any) -> Any:
    """Batches from ``__getitems__`` arrive collated already."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def seeded_subset(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of ``k`` of ``n`` items (None: keep all)."""
    if k is None or k >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def check_image_root(root: str | None) -> None:
    """Fail early, before any logger or process starts, on a missing or image-less root."""
    if root is None:
        raise SelfsupError("data.source=folder needs data.root")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SelfsupError(f"data root not found: {path}")
    for _, _, names in os.walk(path, followlinks=True):
        if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
            return
    raise SelfsupError(
        f"no images found under {path}: expected {path}/train/<class>/<image> "
        f"(and {path}/val/<class>/<image> or {path}/test/<class>/<image>)"
    )


class ImageDataModule(L.LightningDataModule):
    """Images for every stage, from an image folder, a torchvision set or the embedded sample.

    Args:
        root: an ImageFolder root (``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` or
            ``ROOT/test/<class>/*``), or torchvision's files for cifar10/cifar100/stl10.
        source: ``auto`` reads ``root`` as an image folder, or the embedded sample when
            ``root`` is unset.
        image_size: decode images to this square side (shorter side resized, centre crop);
            None keeps the native size (all images must then share it).
        batch_size: images per device per step (the global batch is this times devices).
        val_fraction: share of train held out for evaluation when there is no val/test split.
        max_train_images / max_eval_images: seeded subsets, picked before decoding.
        seed: seeds the held-out split and subsets; fixed so that every stage sees one split.
        download: let torchvision download its datasets (off: nothing is fetched at run time).
        cache_dir: where decoded sets of at least ``cache_min_images`` images are cached;
            None uses ``$SELFSUP_CACHE`` or ``~/.cache/selfsup``.
        drop_last: drop the last incomplete training batch (keeps per-rank batches equal).
    """

    def __init__(
        self,
        root: str | None = None,
        source: Source = "auto",
        image_size: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        max_train_images: int | None = None,
        max_eval_images: int | None = None,
        seed: int = 0,
        download: bool = False,
        cache_dir: str | None = None,
        cache_min_images: int = 5000,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0 < val_fraction < 1:
            raise SelfsupError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.train_set: ImageSet | None = None
        self.eval_set: ImageSet | None = None
        self.eval_split = ""
        if self.source == "folder":
            check_image_root(root)


    @property
    def source(self) -> str:
        s = self.hparams.source
        if s == "auto":
            return "sample" if self.hparams.root is None else "folder"
        return s

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._load()

    def _load(self) -> None:
        hp = self.hparams
        src = self.source
        if src == "sample":
            self.train_set = load_sample_split("train", hp.image_size)
            self.eval_set = load_sample_split("val", hp.image_size)
            self.eval_split = "val"
        elif src == "folder":
            self._load_folder()
        else:
            if hp.root is None:
                raise SelfsupError(f"data.source={src} needs data.root (the folder with torchvision's files)")
            self.train_set = load_torchvision_split(src, hp.root, True, hp.download, hp.image_size)
            self.eval_set = load_torchvision_split(src, hp.root, False, hp.download, hp.image_size)
            self.eval_split = "test"
        if src != "folder":
            for name, k in (("train_set", hp.max_train_images), ("eval_set", hp.max_eval_images)):
                idx = seeded_subset(len(getattr(self, name)), k, hp.seed)
                if idx is not None:
                    setattr(self, name, getattr(self, name).subset(idx))

    def _load_folder(self) -> None:
        hp = self.hparams
        if hp.root is None:
            raise SelfsupError("data.source=folder needs data.root")
        root = Path(hp.root).expanduser()
        if not root.is_dir():
            raise SelfsupError(f"data root not found: {root}")
        train_dir = root / "train" if (root / "train").is_dir() else root
        cache = Path(hp.cache_dir) if hp.cache_dir else default_cache_dir()
        common = {"image_size": hp.image_size, "cache_dir": cache, "cache_min_images": hp.cache_min_images}
        eval_dir = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), None)
        if eval_dir is not None:
            self.train_set = load_folder_split(
                train_dir, select=lambda n: seeded_subset(n, hp.max_train_images, hp.seed), **common
            )
            self.eval_set = load_folder_split(
                eval_dir,
                select=lambda n: seeded_subset(n, hp.max_eval_images, hp.seed),
                classes=self.train_set.classes,
                **common,
            )
            self.eval_split = eval_dir.name
            return
        # No val/test folder: hold out a fixed, seeded share of train.
        def split(n: int, held_out: bool) -> torch.Tensor:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp.seed))
            n_eval = max(1, round(hp.val_fraction * n))
            part = perm[:n_eval] if held_out else perm[n_eval:]
            k = hp.max_eval_images if held_out else hp.max_train_images
            return (part[:k] if k is not None else part).sort().values

        self.train_set = load_folder_split(train_dir, select=lambda n: split(n, False), **common)
        self.eval_set = load_folder_split(train_dir, select=lambda n: split(n, True), **common)
        self.eval_split = f"{train_dir.name} (held out {hp.val_fraction:.0%})"

    # -- facts other stages read -------------------------------------------------------
    def _require(self) -> tuple[ImageSet, ImageSet]:
        if self.train_set is None or self.eval_set is None:
            self.setup()
        assert self.train_set is not None and self.eval_set is not None
        return self.train_set, self.eval_set

    @property
    def num_classes(self) -> int:
        return len(self._require()[0].classes)

    @property
    def classes(self) -> list[str]:
        return self._require()[0].classes

    @property
    def image_size(self) -> int:
        return int(self._require()[0].images.shape[-1])

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, s: ImageSet, train: bool) -> DataLoader:
        hp = self.hparams
        bs = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        if train and hp.drop_last and len(s) < bs:
            raise SelfsupError(f"batch_size {bs} is larger than the {len(s)} training images; lower data.batch_size")
        # RandomSampler (shuffle=True) samples without replacement: every image once per
        # epoch. Under DDP Lightning swaps it for a DistributedSampler: disjoint shards.
        return DataLoader(
            TensorImageDataset(s),
            batch_size=bs,
            shuffle=train,
            drop_last=train and hp.drop_last,
            num_workers=hp.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require()[0], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require()[1], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require()[1], train=False)
