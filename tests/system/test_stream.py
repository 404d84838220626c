"""`selfsup data optimize`: image folders written as real LitData datasets and streamed back."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from selfsup import SelfsupError
from selfsup.cli import main
from selfsup.data import ImageDataModule
from selfsup.data.litdata.samples import (
    CropViews,
    RandomSquare,
    Undecoded,
    collate_undecoded,
    decode_batch_on_device,
    decode_crops,
    decode_sample,
)
from selfsup.data.litdata.write import optimize_folder

from conftest import write_image_folder
from reference import decode_crop, random_crops, streamed_images

pytest.importorskip("litdata")

from selfsup.evaluation.online import OnlineSpec  # noqa: E402
from selfsup.methods import BYOL, DINO, MAE, FineTune, LinearProbe, RelativeLocation, SimCLR, VICReg  # noqa: E402


def read_split(directory: Path) -> list[dict]:
    """Every stored sample of a split, the image as the bytes written."""
    import litdata

    ds = litdata.StreamingDataset(str(directory))
    return [ds[i] for i in range(len(ds))]


def test_optimize_a_labeled_folder_keeps_jpegs_and_streams_them_back(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
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
    meta = optimize_folder(tmp_path / "photos", out, max_side=45, workers=1, val_fraction=0)
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
    """The sawtooth value at the centers of ``size`` output pixels covering [start, start + length)."""
    centers = start + (np.arange(size) + 0.5) * length / size - 0.5
    return (np.round(centers) % 8) * 32 + 8


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


# -- training on a streamed dataset ---------------------------------------------------------
class Batches(L.Callback):
    """What every training batch held: its keys, shapes and image rows."""

    def __init__(self) -> None:
        self.shapes: list[dict[str, tuple[int, ...]]] = []
        self.rows: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        self.shapes.append({k: tuple(v.shape) for k, v in batch.items()})
        self.rows += batch["index"].tolist()


def fit_streamed(model: L.LightningModule, dm: ImageDataModule, tmp_path: Path, **kw) -> Batches:
    seen = Batches()
    kw = {"max_epochs": 1, **kw}
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[seen],
        **kw,
    ).fit(model, datamodule=dm)
    return seen


@pytest.fixture
def streamed(image_folder: Path, tmp_path: Path) -> Path:
    """The 3-class folder (120 train / 30 val images) written as a LitData dataset."""
    optimize_folder(image_folder, tmp_path / "optimized", workers=2)
    return tmp_path / "optimized"


TINY = {"backbone": {"name": "small_cnn", "width": 8}}


def test_every_stage_trains_on_a_streamed_labeled_dataset(
    streamed: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dm = ImageDataModule(root=str(streamed), source="stream", image_size=32, batch_size=20, num_workers=1)
    assert dm.num_classes == 3  # from selfsup.json, before anything is read
    dm.setup()
    assert "streaming" in capsys.readouterr().out and (len(dm.train_set), len(dm.eval_set)) == (120, 30)
    labels = json.loads((streamed / "train_labels.json").read_text())
    assert dm.train_set.labels.tolist() == labels and Counter(labels) == {0: 40, 1: 40, 2: 40}
    assert labels != sorted(labels)  # stored in a seeded random order, not class after class
    # SimCLR: the crops come from the workers, cut from the full images at the view size.
    simclr = SimCLR(**TINY, proj_hidden=16, views={"size": 16}, online=OnlineSpec(knn_every=1), num_classes=3)
    seen = fit_streamed(simclr, dm, tmp_path)
    assert seen.shapes[0] == {"views": (20, 2, 3, 16, 16), "label": (20,), "index": (20,)}
    assert sorted(seen.rows) == list(range(120)) and seen.rows != sorted(seen.rows)  # each image once, shuffled
    # BYOL and VICReg: the same crops from the workers.
    for method in (BYOL(**TINY, proj_hidden=16, pred_hidden=16, views={"size": 16}), VICReg(**TINY, expander_dim=16)):
        assert fit_streamed(method, dm, tmp_path).shapes[0]["views"][:2] == (20, 2)
    # DINO: the image at its size from the workers, the multi-crop views cut on the device; MAE:
    # one crop from the workers.
    seen = fit_streamed(DINO(**TINY, out_dim=32, hidden_dim=16, bottleneck_dim=8, crops={"num_local": 2}), dm, tmp_path)
    assert seen.shapes[0]["image"] == (20, 3, 32, 32)
    vit = {"name": "timm:vit_tiny_patch16_224", "image_size": 32, "patch_size": 8, "timm_kwargs": {"depth": 1}}
    seen = fit_streamed(MAE(backbone=vit, decoder_dim=16, decoder_depth=1, decoder_heads=2), dm, tmp_path)
    assert seen.shapes[0]["views"] == (20, 1, 3, 32, 32)
    # Relative location: a square of each full image, the grid drawn on the device.
    seen = fit_streamed(RelativeLocation(**TINY, head_hidden=16), dm, tmp_path)
    assert seen.shapes[0]["image"] == (20, 3, 32, 32)
    # The probe's search computes every training feature first: its training batches carry no images.
    probe = LinearProbe(**TINY, num_classes=3, search={"lrs": [0.01, 0.1], "weight_decays": [0.0]})
    seen = fit_streamed(probe, dm, tmp_path, max_epochs=2)
    assert set(seen.shapes[0]) == {"label", "index"} and probe.chosen.lr in (0.01, 0.1)
    finetune = FineTune(**TINY, num_classes=3)
    seen = fit_streamed(finetune, dm, tmp_path)
    assert seen.shapes[0]["image"] == (20, 3, 32, 32)
    # A label fraction is a subset of the split: read by row, in a seeded order.
    part = dm.derived(label_fraction=0.25)
    assert len(part.train_set) == 30 and not part.train_set.images.streams_whole_split
    seen = fit_streamed(FineTune(**TINY, num_classes=3), part, tmp_path)
    assert len(seen.rows) == 20 and set(seen.rows) <= set(range(30))


def test_an_unlabeled_folder_streams_into_simclr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for k, p in enumerate(sorted(write_image_folder(tmp_path / "images", {"train": 12}).rglob("*.jpg"))):
        p.rename(flat / f"{k:03d}.jpg")  # no class folders: unlabeled
    meta = optimize_folder(flat, tmp_path / "optimized", workers=1, val_fraction=0.25)
    assert meta["labels"] == "none" and meta["splits"]["val"]["written"] == 9
    assert not (tmp_path / "optimized" / "train_labels.json").exists()
    dm = ImageDataModule(root=str(tmp_path / "optimized"), source="stream", image_size=32, batch_size=9)
    assert dm.num_classes is None
    dm.setup()
    assert dm.train_set.labels.tolist() == [-1] * 27 and not dm.has_labels
    seen = fit_streamed(SimCLR(**TINY, proj_hidden=16), dm, tmp_path)
    assert seen.shapes[0]["views"] == (9, 2, 3, 32, 32) and len(seen.rows) == 27
    assert "online evaluation off: the pretraining images have no labels" in capsys.readouterr().out


def test_stream_needs_an_optimized_folder_and_a_size(image_folder: Path, streamed: Path) -> None:
    with pytest.raises(SelfsupError, match="needs data.image_size"):
        ImageDataModule(root=str(streamed), source="stream")
    with pytest.raises(SelfsupError, match="selfsup.json not found: is .* a folder written by selfsup data optimize"):
        ImageDataModule(root=str(image_folder), source="stream", image_size=32)


def test_decoding_on_the_device_matches_decoding_in_the_workers(streamed: Path, tmp_path: Path) -> None:
    """decode_on=device: the workers draw the boxes and keep the bytes; torchvision's batched
    decode_jpeg and a resized crop on the device (here the CPU: the same calls as on a GPU)
    give the crops the workers would have cut from the full image."""
    data = sawtooth_jpeg(400, 300)
    sample = {"image": data, "height": 300, "width": 400, "label": 2}
    views = CropViews(2, 48, scale=(0.02, 0.05))
    torch.manual_seed(0)
    batch = collate_undecoded([Undecoded(views)(sample), Undecoded(views)(sample)])
    assert isinstance(batch["jpeg"], list) and batch["boxes"].shape == (2, 2, 4) and batch["label"].tolist() == [2, 2]
    boxes, flips = batch["boxes"].clone(), batch["flips"].clone()
    out = decode_batch_on_device(batch, views, torch.device("cpu"))
    assert out["views"].shape == (2, 2, 3, 48, 48) and out["views"].dtype == torch.uint8
    for i in range(2):
        ref = decode_crops(data, [tuple(b) for b in boxes[i].tolist()], 48, flips[i].tolist())
        assert (out["views"][i].float() - ref.float()).abs().mean() < 6  # two decoders, two resamplers
        assert float(out["views"][i, 0, 0].float().mean(0).std()) > 25  # the teeth: full resolution
    # Through a Trainer: the DataModule decodes each streamed batch before it reaches the step.
    dm = ImageDataModule(root=str(streamed), source="stream", image_size=32, batch_size=20, decode_on="device")
    seen = fit_streamed(
        SimCLR(**TINY, proj_hidden=16, views={"size": 16}, online=OnlineSpec(enabled=False)), dm, tmp_path
    )
    assert seen.shapes[0] == {"views": (20, 2, 3, 16, 16), "label": (20,), "index": (20,)} and len(seen.rows) == 120
    with pytest.raises(SelfsupError, match="decode_on=device needs data.source=stream"):
        ImageDataModule(decode_on="device")


def test_relative_locations_square_is_cut_from_the_full_image() -> None:
    """Relative location on a streamed dataset gets a square of the image's full height at a
    random place along its width, decoded at the grid's size: at full size the teeth of the
    oracle image are all there, and the squares' offsets cover the width."""
    data = sawtooth_jpeg(400, 300)
    sample = {"image": data, "height": 300, "width": 400, "label": -1}
    torch.manual_seed(0)
    offsets = set()
    for _ in range(12):
        boxes, _ = RandomSquare(300).boxes(300, 400)
        x0, y0, w, h = boxes[0].tolist()
        assert (y0, w, h) == (0, 300, 300) and 0 <= x0 <= 100
        offsets.add(x0)
    assert len(offsets) > 6  # anywhere along the width, not the center only
    torch.manual_seed(1)
    x0 = RandomSquare(300).boxes(300, 400)[0][0, 0].item()
    torch.manual_seed(1)
    square = RandomSquare(300)(sample)["image"].numpy().astype(float)
    assert square.shape == (3, 300, 300)
    assert np.corrcoef(square[0].mean(0), expected_teeth(x0, 300, 300))[0, 1] > 0.9  # columns from x0 on
    assert np.corrcoef(square[1].mean(1), expected_teeth(0, 300, 300))[0, 1] > 0.9


def test_a_stream_resumed_twice_in_one_epoch_and_a_position_from_an_ended_epoch(streamed: Path) -> None:
    """The loader's saved position, restored twice within its second epoch (2 workers, whose
    batches alternate), gives the uninterrupted epoch's batches in order; a position saved in an
    epoch that ended early (limit_train_batches) is not resumed in the next epoch, which starts
    whole with its own order."""
    from selfsup.data.litdata.dataset import StreamedDataset, TrainedPositionLoader
    from selfsup.data.litdata.samples import LabelOnly

    trained, fit_epoch = [0], [0]

    def loader() -> TrainedPositionLoader:
        ds = StreamedDataset(str(streamed / "train"), LabelOnly(), shuffle=True, seed=3, drop_last=True)
        return TrainedPositionLoader(
            ds,
            batch_size=10,
            num_workers=2,
            drop_last=True,
            trained_batches=lambda: trained[0],
            fit_epoch=lambda: fit_epoch[0],
        )

    def rows(batches) -> list[list[int]]:
        return [b["index"].tolist() for b in batches]

    reference = loader()
    epochs = [rows(reference) for _ in range(3)]  # uninterrupted
    assert len(epochs[0]) == 12 and sorted(sum(epochs[1], [])) == list(range(120)) and epochs[0] != epochs[1]
    a = loader()
    rows(a)  # the first epoch, whole
    fit_epoch[0] = 1
    it = iter(a)
    got = rows(next(it) for _ in range(4))
    trained[0] = 4
    state = a.state_dict()
    b = loader()
    b.load_state_dict(state)
    it = iter(b)
    got += rows(next(it) for _ in range(3))
    trained[0] = 7
    again = b.state_dict()
    c = loader()
    c.load_state_dict(again)
    got += rows(c)
    assert got == epochs[1]  # resumed twice: the same batches, in order, none twice
    # Saved 4 batches into an epoch that Lightning then ended: the next epoch is whole.
    fit_epoch[0] = 2
    d = loader()
    d.load_state_dict(state)
    assert rows(d) == epochs[2]


def test_lazy_rows_by_mask_and_device_decoding_beside_separate_evaluation_data(
    streamed: Path, image_folder: Path
) -> None:
    dm = ImageDataModule(
        root=str(streamed),
        source="stream",
        image_size=32,
        batch_size=20,
        decode_on="device",
        eval_root=str(image_folder),
    )
    dm.setup()  # the separate evaluation data decodes into memory as usual
    assert dm.evaluation_data is not dm and dm.evaluation_data.num_classes == 3
    images = dm.train_set.images
    mask = torch.zeros(len(images), dtype=torch.bool)
    mask[[5, 17, 99]] = True
    assert torch.equal(images[mask], images[torch.tensor([5, 17, 99])])
    assert torch.equal(images.subset(mask)[:], images[[5, 17, 99]])
    assert images[[5, 17, 99]].shape == (3, 3, 32, 32) and not torch.equal(images[5], images[17])
