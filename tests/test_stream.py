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
from selfsup.data.stream import decode_sample, optimize_folder, streamed_images

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
