"""Sources, splits, caching, shuffling and sharding of the DataModule, on real image files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from selfsup import SelfsupError
from selfsup.data import ImageDataModule
from selfsup.data.loaders import TensorImageDataset
from selfsup.data.splits import label_fraction_subset

from conftest import write_image_folder


def test_image_folder_with_train_and_val(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    dm.setup("fit")
    assert dm.source == "folder"
    assert len(dm.train_set) == 120 and len(dm.eval_set) == 30
    assert dm.num_classes == 3 and dm.image_size == 32 and dm.eval_split == "val"
    assert dm.train_set.images.dtype == torch.uint8
    assert dm.train_set.images.shape == (120, 3, 32, 32)
    assert torch.bincount(dm.eval_set.labels).tolist() == [10, 10, 10]
    # Decoded pixels are the files' pixels.
    first = sorted((image_folder / "train" / dm.classes[0]).iterdir())[0]
    pixels = torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(dm.train_set.images[0], pixels)


def test_test_folder_is_used_when_there_is_no_val(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "r", {"train": 5, "test": 3})
    dm = ImageDataModule(root=str(root))
    dm.setup()
    assert dm.eval_split == "test" and len(dm.eval_set) == 9


def test_held_out_split_is_fixed_disjoint_and_seeded(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "r", {"train": 20})
    splits = []
    for seed in (0, 0, 1):
        dm = ImageDataModule(root=str(root), val_fraction=0.25, seed=seed, cache_dir=None)
        dm.setup()
        splits.append((dm.train_set.images.flatten(1), dm.eval_set.images.flatten(1)))
    (tr, ev), (tr2, ev2), (tr3, ev3) = splits
    assert len(tr) == 45 and len(ev) == 15
    assert torch.equal(tr, tr2) and torch.equal(ev, ev2)  # fixed
    assert not torch.equal(ev, ev3)  # another seed, another split
    seen = {tuple(x.tolist()) for x in tr}
    assert not any(tuple(x.tolist()) in seen for x in ev)  # disjoint


def test_resizes_mixed_sizes_and_converts_modes(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for split in ("train", "val"):
        d = root / split / "a"
        d.mkdir(parents=True)
        Image.new("L", (40, 30), 128).save(d / "gray.png")
        Image.new("RGBA", (50, 50), (10, 20, 30, 40)).save(d / "rgba.png")
        Image.new("P", (32, 64)).save(d / "palette.bmp")
    with pytest.raises(SelfsupError, match="different sizes"):
        ImageDataModule(root=str(root)).setup()
    dm = ImageDataModule(root=str(root), image_size=24)
    dm.setup()
    assert dm.train_set.images.shape == (3, 3, 24, 24)
    assert (dm.train_set.images[0] == 128).all()  # gray.png: L -> RGB


def test_decoded_sets_are_cached(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "r", {"train": 10, "val": 2})
    cache = tmp_path / "decoded"
    dm = ImageDataModule(root=str(root), cache_dir=str(cache), cache_min_images=1)
    dm.setup()
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2
    # A second module reads the cache: prove it by planting a marker in the cached tensor.
    blob = torch.load(files[0], weights_only=True)
    blob["images"][0, 0, 0, 0] = 7 if int(blob["images"][0, 0, 0, 0]) != 7 else 8
    torch.save(blob, tmp_path / "planted.pt")
    os.replace(tmp_path / "planted.pt", files[0])  # as the cache is written: never in place
    dm2 = ImageDataModule(root=str(root), cache_dir=str(cache), cache_min_images=1)
    dm2.setup()
    changed = [
        not torch.equal(a.images, b.images) for a, b in ((dm.train_set, dm2.train_set), (dm.eval_set, dm2.eval_set))
    ]
    assert sum(changed) == 1


def test_embedded_sample() -> None:
    dm = ImageDataModule(max_train_images=500, max_eval_images=100)
    dm.setup()
    assert dm.source == "sample"
    assert len(dm.train_set) == 500 and len(dm.eval_set) == 100
    assert dm.classes[:3] == ["airplane", "automobile", "bird"] and dm.num_classes == 10


def test_every_image_once_per_epoch_and_reshuffled(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=16, drop_last=False)
    dm.setup()
    epochs = []
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # as Lightning does at every epoch start
        epochs.append(torch.cat([b["index"] for b in loader]))
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(120))  # without replacement
    assert not torch.equal(epochs[0], epochs[1])
    # A restart after 3 trained batches of epoch 1 continues with the 4th batch of that epoch.
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches": 3, "batch_size": 16})
    loader.sampler.set_epoch(1)
    assert torch.equal(torch.cat([b["index"] for b in loader]), epochs[1][48:])
    loader.sampler.set_epoch(2)  # only the first pass after a restart starts late
    assert len(torch.cat([b["index"] for b in loader])) == 120
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["image"], dm.train_set.images[batch["index"]])
    assert torch.equal(batch["label"], dm.train_set.labels[batch["index"]])


def test_ranks_get_disjoint_shards(image_folder: Path) -> None:
    # The sampler Lightning installs under DDP, on our dataset: two ranks, one epoch.
    dm = ImageDataModule(root=str(image_folder))
    dm.setup()
    ds = TensorImageDataset(dm.train_set)
    shards = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(120))


def test_bad_roots_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="data root not found"):
        ImageDataModule(root=str(tmp_path / "nope"))
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(SelfsupError, match="no images found"):
        ImageDataModule(root=str(tmp_path / "empty"))
    with pytest.raises(SelfsupError, match="cifar10 files not found"):
        ImageDataModule(root=str(tmp_path), source="cifar10").setup()


def test_batch_larger_than_dataset_fails_clearly(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=1000)
    with pytest.raises(SelfsupError, match="larger than"):
        dm.train_dataloader()


def test_label_fractions_are_class_balanced_seeded_and_the_same_whoever_asks(image_folder: Path) -> None:
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 7)
    one = label_fraction_subset(labels, 0.01, seed=0)
    assert [int((labels[one] == c).sum()) for c in range(3)] == [5, 3, 1]  # 1% of each class, at least one
    ten = label_fraction_subset(labels, 0.1, seed=0)
    assert [int((labels[ten] == c).sum()) for c in range(3)] == [50, 30, 1]
    assert torch.equal(one, label_fraction_subset(labels, 0.01, seed=0))  # seeded
    assert not torch.equal(ten, label_fraction_subset(labels, 0.1, seed=1))
    assert torch.equal(label_fraction_subset(labels, 1.0, seed=0), torch.arange(len(labels)))
    with pytest.raises(SelfsupError, match="label_fraction must be in"):
        label_fraction_subset(labels, 0.0, seed=0)
    # The data module: the same decoded images, a tenth of the training labels, the same
    # evaluation split; asked twice, the same images.
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    a, b = dm.derived(label_fraction=0.1, batch_size=4), dm.derived(label_fraction=0.1)
    assert len(a.train_set) == 12 and a.hparams.batch_size == 4 and torch.equal(a.train_set.images, b.train_set.images)
    assert a.eval_set is dm.eval_set and a.train_set.labels.bincount().tolist() == [4, 4, 4]
