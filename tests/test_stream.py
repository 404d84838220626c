"""`selfsup data optimize`: image folders written as real LitData datasets and streamed back."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image_folder
from selfsup import SelfsupError
from selfsup.cli import main
from selfsup.data.stream import (
    decode_crop,
    decode_sample,
    optimize_folder,
    random_crops,
    streamed_images,
)

pytest.importorskip("litdata")


def read_split(directory: Path) -> list[dict]:
    """Every stored sample of a split, the image as the bytes written."""
    import litdata

    ds = litdata.StreamingDataset(str(directory))
    return [ds[i] for i in range(len(ds))]


def test_optimize_a_labelled_folder_keeps_jpegs_and_streams_them_back(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    root = write_image_folder(tmp_path / "images", {"train": 10, "val": 4})
    png = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "drawn.png"
    y, x = np.mgrid[0:20, 0:30]
    pixels = np.stack([x * 8, y * 12, np.full_like(x, 90)], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it
    Image.fromarray(pixels).save(png)
    (root / "train" / png.parent.name / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "optimized"
    main(["data", "optimize", "--src", str(root), "--out", str(out), "--workers", "2"])
    assert "wrote train 31, val 12 images" in capsys.readouterr().out
    meta = json.loads((out / "selfsup.json").read_text())
    assert meta["labels"] == "folders" and len(meta["classes"]) == 3 and meta["skipped"] == 1
    assert meta["splits"] == {"train": {"found": 32, "written": 31}, "val": {"found": 12, "written": 12}}
    assert (out / "bad_files.txt").read_text().startswith(str(root / "train" / png.parent.name / "broken.jpg"))

    train = read_split(out / "train")
    # JPEGs byte for byte; the PNG re-encoded as a JPEG of the same pixels and size.
    jpegs = {p.read_bytes() for p in (root / "train").rglob("*.jpg") if p.name != "broken.jpg"}
    stored = [s["image"] for s in train]
    assert jpegs <= set(stored) and len(stored) == len(jpegs) + 1
    (redone,) = [s for s in train if s["image"] not in jpegs]
    assert (redone["width"], redone["height"], redone["label"]) == (30, 20, 0)
    back = np.asarray(Image.open(io.BytesIO(redone["image"])))
    assert np.abs(back.astype(int) - pixels.astype(int)).mean() < 3  # JPEG at quality 95
    assert Counter(s["label"] for s in train) == {0: 11, 1: 10, 2: 10}
    assert all((s["width"], s["height"]) == (32, 32) for s in train if s is not redone)
    assert Counter(s["label"] for s in read_split(out / "val")) == {0: 4, 1: 4, 2: 4}

    # Streamed back through LitData, decoded as the in-memory path stores images.
    ds = streamed_images(out / "train", image_size=16)
    sample = ds[0]
    assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.uint8
    full = decode_sample(train[0]["image"], None)
    assert full.shape == (3, 32, 32)


def test_optimize_an_unlabeled_folder_shrinks_what_is_too_large(tmp_path: Path) -> None:
    photos = tmp_path / "photos" / "2019" / "trip"
    photos.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((60 + i, 90, 3), 40 * i, dtype=np.uint8)).save(photos / f"IMG_{i}.jpg", quality=90)
    small = np.full((20, 20, 3), 200, dtype=np.uint8)
    Image.fromarray(small).save(photos / "small.jpg")
    out = tmp_path / "optimized"
    meta = optimize_folder(tmp_path / "photos", out, max_side=45, workers=1)
    assert meta["labels"] == "none" and meta["classes"] == [] and set(meta["splits"]) == {"train"}
    samples = read_split(out / "train")
    assert len(samples) == 6 and {s["label"] for s in samples} == {-1}
    assert all(max(s["width"], s["height"]) <= 45 for s in samples)
    assert (photos / "small.jpg").read_bytes() in {s["image"] for s in samples}  # small enough: kept as it is
    assert not (out / "bad_files.txt").exists()
    with pytest.raises(SelfsupError, match="--src not found"):
        optimize_folder(tmp_path / "nowhere", out)


def sawtooth_jpeg(width: int = 400, height: int = 300) -> bytes:
    """An oracle image whose pixels encode their coordinates at full resolution: red rises by 32
    per pixel along x and wraps every 8 pixels, green the same along y. Any copy at a lower
    resolution averages the teeth away."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x % 8) * 32 + 8, (y % 8) * 32 + 8, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=100, subsampling=0)
    return out.getvalue()


def expected_teeth(start: float, length: float, size: int) -> np.ndarray:
    """The sawtooth value at the centres of ``size`` output pixels covering [start, start + length)."""
    centres = start + (np.arange(size) + 0.5) * length / size - 0.5
    return (np.round(centres) % 8) * 32 + 8


def test_a_crop_comes_from_the_full_resolution_image() -> None:
    data = sawtooth_jpeg()
    # A 24 x 24 box at (101, 53), upsampled to 48: two output pixels per source pixel.
    crop = decode_crop(data, (101.0, 53.0, 24.0, 24.0), 48).numpy().astype(float)
    red, green = crop[0].mean(0), crop[1].mean(1)  # along x, along y
    assert red.std() > 60 and green.std() > 60  # the teeth are there: full resolution
    assert np.corrcoef(red, expected_teeth(101, 24, 48))[0, 1] > 0.9
    assert np.corrcoef(green, expected_teeth(53, 24, 48))[0, 1] > 0.9
    # Flipped: the same columns in reverse order.
    flipped = decode_crop(data, (101.0, 53.0, 24.0, 24.0), 48, flip=True).numpy()
    assert np.abs(flipped[0][:, ::-1].astype(int) - crop[0]).mean() < 1
    # The whole image into 32 pixels decodes at a reduced scale and averages the teeth, as it should.
    whole = decode_crop(data, (0.0, 0.0, 400.0, 300.0), 32).numpy().astype(float)
    assert whole[0].std() < 40 and abs(whole[0].mean() - 120) < 12


def test_random_crops_are_drawn_against_each_images_own_size() -> None:
    data = sawtooth_jpeg(400, 300)
    g = torch.Generator().manual_seed(0)
    views = random_crops(data, 300, 400, n=6, size=32, scale=(0.02, 0.05), generator=g)
    assert views.shape == (6, 3, 32, 32) and views.dtype == torch.uint8
    # Crops of 2-5% of a 400 x 300 image are 50-80 pixels across, so 32 output pixels still show
    # teeth 8 pixels apart; cut from a 32-pixel copy of the image they would be flat.
    assert all(float(v[0].float().mean(0).std()) > 25 for v in views)
