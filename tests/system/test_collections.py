"""Image collections as people have them: unlabeled folders at any depth, imperfect files,
separate labeled evaluation data, one decode per job. Real image files throughout."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup import SelfsupError
from selfsup.cli import SelfsupCLI, main
from selfsup.data import ImageDataModule
from selfsup.data.folders import resolve_labels, scan_folder
from selfsup.data.sources import SAMPLE_ZIP
from selfsup.pipeline import pipeline_main

from conftest import SMALL_SIMCLR, write_image_folder
from reference import decode_image

REPO = Path(__file__).resolve().parents[2]


def sample_jpegs(n: int, offset: int = 0) -> list[bytes]:
    """``n`` real CIFAR-10 JPEGs from the embedded sample, mixed classes."""
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(x for x in zf.namelist() if x.startswith("train/") and x.endswith(".jpg"))
        step = len(names) // (n + offset)
        return [zf.read(x) for x in names[offset * step :: step][:n]]


def write_unlabeled(root: Path, n: int, nested: bool = False) -> Path:
    """``n`` photos straight in ``root``, or spread over dated folders two levels deep."""
    for i, data in enumerate(sample_jpegs(n)):
        d = root / f"{2019 + i % 3}" / f"trip{i % 2}" if nested else root
        d.mkdir(parents=True, exist_ok=True)
        (d / f"IMG_{i:04d}.jpg").write_bytes(data)
    return root


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    return write_unlabeled(tmp_path / "photos", 64)


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    return write_unlabeled(tmp_path / "archive", 64, nested=True)


# -- finding images and labels --------------------------------------------------------------------
def test_scan_is_recursive_follows_links_skips_hidden_and_keeps_a_fixed_order(tmp_path: Path) -> None:
    root = write_unlabeled(tmp_path / "a", 12, nested=True)
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(sample_jpegs(1)[0])
    (root / ".hidden.jpg").write_bytes(sample_jpegs(1)[0])
    (root / "notes.txt").write_text("not an image")
    (root / "UPPER.JPG").write_bytes(sample_jpegs(1)[0])
    outside = write_unlabeled(tmp_path / "elsewhere", 3)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "2019" / "loop").symlink_to(root, target_is_directory=True)  # a link loop ends
    scan = scan_folder(root)
    assert len(scan.files) == 12 + 1 + 3
    assert scan.ignored == 1  # notes.txt
    assert not any("/." in str(f) or f.name.startswith(".") for f in scan.files)
    assert "linked/IMG_0000.jpg" in scan.relative and "UPPER.JPG" in scan.relative
    assert scan.relative == sorted(scan.relative)
    assert scan_folder(root).relative == scan.relative  # the same order every time


def test_label_choice(tmp_path: Path) -> None:
    labeled = write_image_folder(tmp_path / "l", {"train": 4})
    (labeled / "train" / "empty_class").mkdir()
    (labeled / "train" / "empty_class" / "readme.txt").write_text("no images")
    scan = scan_folder(labeled / "train")
    auto = resolve_labels(scan, "auto")
    assert auto.mode == "folders" and auto.classes == ["airplane", "automobile", "bird"]  # empty folder: no class
    assert sorted(set(auto.labels)) == [0, 1, 2]
    assert resolve_labels(scan, "none").labels == [-1] * 12
    flat = scan_folder(write_unlabeled(tmp_path / "f", 5))
    assert resolve_labels(flat, "auto").mode == "none"
    with pytest.raises(SelfsupError, match="not in a class folder"):
        resolve_labels(flat, "folders")
    one = tmp_path / "one" / "holiday"
    write_unlabeled(one, 3)
    assert resolve_labels(scan_folder(tmp_path / "one"), "auto").mode == "none"  # one folder is no class set
    # A loose image among class folders: auto reads the whole split as unlabeled.
    (labeled / "train" / "loose.jpg").write_bytes(sample_jpegs(1)[0])
    assert resolve_labels(scan_folder(labeled / "train"), "auto").mode == "none"


@pytest.mark.parametrize("layout", ["flat", "nested", "train_subfolder"])
def test_unlabeled_folder_becomes_a_training_set(layout: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if layout == "train_subfolder":  # ROOT/train/*.jpg
        write_unlabeled(tmp_path / "r" / "train", 40)
    else:
        write_unlabeled(tmp_path / "r", 40, nested=layout == "nested")
    dm = ImageDataModule(root=str(tmp_path / "r"), image_size=32, val_fraction=0.25)
    dm.setup()
    assert not dm.has_labels and dm.num_classes is None and dm.evaluation_data is None
    assert (len(dm.train_set), len(dm.eval_set)) == (30, 10)
    assert (dm.train_set.labels == -1).all()
    out = capsys.readouterr().out
    assert "40 images, unlabeled" in out and "data.labels=auto" in out


# -- imperfect files --------------------------------------------------------------------------------
def exif_rotated_jpeg() -> bytes:
    """40x20 pixels, left half red, right half blue, stored with EXIF orientation 6: a viewer
    turns it 90 degrees clockwise, showing red on top of blue, 20 wide and 40 tall."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def write_imperfect_folder(root: Path) -> tuple[set[str], int]:
    """A labeled folder holding every case a real collection has: returns the relative paths
    of the unreadable files and the number of readable images."""
    good = sample_jpegs(30)
    a, b = root / "train" / "a", root / "train" / "b"
    for d in (a, b, root / "train" / "empty_class"):
        d.mkdir(parents=True)
    for i, data in enumerate(good):
        ((a if i % 2 else b) / f"{i:03d}.jpg").write_bytes(data)
    rgb = np.asarray(Image.open(io.BytesIO(good[0])).convert("RGB"))
    Image.fromarray(rgb).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(a / "gray16.png")
    Image.fromarray(rgb).convert("P").save(a / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 128, np.uint8)])).save(b / "rgba.png")
    Image.fromarray(rgb).convert("L").save(b / "gray.png")
    (b / "rotated.jpg").write_bytes(exif_rotated_jpeg())
    Image.fromarray(rgb[:8, :8]).save(b / "tiny.png")  # smaller than any patch grid
    (root / "train" / "empty_class" / "notes.txt").write_text("a text file, no images")
    # Unreadable:
    (a / "truncated.jpg").write_bytes(good[1][: len(good[1]) // 2])
    (a / "empty.jpg").write_bytes(good[2][:20])  # a JPEG header and nothing after it
    (b / "zero.jpg").write_bytes(b"")
    (b / "garbage.jpg").write_bytes(os.urandom(2000))
    Image.new("1", (14000, 14000)).save(b / "bomb.png")  # 196 M pixels: a decompression bomb
    bad = {"a/truncated.jpg", "a/empty.jpg", "b/zero.jpg", "b/garbage.jpg", "b/bomb.png"}
    return bad, 30 + 7


@pytest.fixture(scope="module")
def imperfect(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], int]:
    root = tmp_path_factory.mktemp("imperfect") / "data"
    bad, readable = write_imperfect_folder(root)
    return root, bad, readable


def test_conversions_show_what_a_viewer_shows(imperfect: tuple[Path, set[str], int]) -> None:
    root, _, _ = imperfect
    a, b = root / "train" / "a", root / "train" / "b"
    ref = np.asarray(Image.open(a / "cmyk.jpg").convert("CMYK").convert("RGB")).astype(int)
    cmyk = decode_image(a / "cmyk.jpg", None)
    assert cmyk.shape == (32, 32, 3) and np.abs(cmyk.astype(int) - ref).max() <= 1
    g16 = decode_image(a / "gray16.png", None)
    expect = np.rint(np.arange(32 * 32).reshape(32, 32) * 60 / 257).astype(np.uint8)
    assert np.array_equal(g16[..., 0], expect) and np.array_equal(g16[..., 0], g16[..., 2])  # scaled, not clipped
    pal = Image.open(a / "palette.png")
    assert np.array_equal(decode_image(a / "palette.png", None), np.asarray(pal.convert("RGB")))
    rgba = np.asarray(Image.open(b / "rgba.png")).astype(float)
    over_white = np.rint(rgba[..., :3] * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(decode_image(b / "rgba.png", None).astype(float) - over_white).max() <= 1
    gray = decode_image(b / "gray.png", None)
    assert gray.shape == (32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 1])
    rot = decode_image(b / "rotated.jpg", None)
    assert rot.shape == (40, 20, 3)  # height 40, width 20: turned as the EXIF tag says
    top, bottom = rot[:16].reshape(-1, 3).mean(0), rot[24:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top, blue below


def test_bad_files_are_skipped_named_and_counted(
    imperfect: tuple[Path, set[str], int], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, bad, readable = imperfect
    dm = ImageDataModule(root=str(root), image_size=32, val_fraction=0.2)
    dm.run_dir = str(tmp_path / "run")
    dm.setup()
    out = capsys.readouterr().out
    assert dm.classes == ["a", "b"]  # the empty class folder is no class
    assert dm.image_counts == {"used": readable, "skipped": len(bad)}
    assert len(dm.train_set) + len(dm.eval_set) == readable
    named = {str(Path(p).relative_to(root / "train")) for p, _ in dm.bad_files()}
    assert named == bad
    reasons = dict((str(Path(p).relative_to(root / "train")), why) for p, why in dm.bad_files())
    assert reasons["b/zero.jpg"] == "empty file (0 bytes)"
    assert reasons["b/bomb.png"].startswith("decompression bomb")
    assert reasons["b/garbage.jpg"] == "not an image Pillow can read"
    assert "truncated" in reasons["a/truncated.jpg"].lower()
    listed = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert {str(Path(x.split("\t")[0]).relative_to(root / "train")) for x in listed} == bad
    line = [x for x in out.splitlines() if "cannot be decoded" in x]
    assert len(line) == 1 and f"skipped {len(bad)} of {readable + len(bad)} image files" in line[0]
    assert "bad_files.txt" in line[0]
    assert "2 images smaller than 32 px were upscaled" in out  # tiny.png (8 px) and rotated.jpg (20 px)


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


TINY_SIMCLR = [
    *SMALL_SIMCLR,
    "--model.init_args.proj_hidden",
    "16",
    "--model.init_args.optimizer.name",
    "adam",
    "--model.init_args.optimizer.lr",
    "0.002",
    "--data.batch_size",
    "8",
    "--trainer.max_steps",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


def test_stop_policy_ends_before_any_logger_and_skip_trains(
    imperfect: tuple[Path, set[str], int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, bad, readable = imperfect
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["fit", *TINY_SIMCLR, "--data.root", str(root), "--data.bad_files", "stop"], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("selfsup: error:")]
    assert (
        f"{len(bad)} of {readable + len(bad)} image files cannot be decoded" in line and "data.bad_files skip" in line
    )
    assert "truncated.jpg" in line or "empty.jpg" in line
    assert not (tmp_path / "runs" / "wandb").exists()  # stopped before W&B started
    assert not list((tmp_path / "runs").rglob("config.yaml")) and not list((tmp_path / "runs").rglob("*.ckpt"))
    listed = list((tmp_path / "runs").rglob("bad_files.txt"))
    assert len(listed) == 1 and len(listed[0].read_text().splitlines()) == len(bad)

    code, out, err = run_main(["fit", *TINY_SIMCLR, "--data.root", str(root)], capsys)  # default: skip
    assert code == 0, err
    assert "cannot be decoded (data.bad_files=skip)" in out
    (config,) = list((tmp_path / "runs").rglob("config.yaml"))
    assert len((config.parent / "bad_files.txt").read_text().splitlines()) == len(bad)  # beside the run's config


# -- every pretraining stage without labels, and with separate labeled evaluation data -------------
METHOD_ARGS = {
    "relative_location": [
        "--config",
        str(REPO / "configs/relative_location/cifar10.yaml"),
        "--model.init_args.backbone.width",
        "8",
        "--model.init_args.head_hidden",
        "16",
    ],
    "simclr": TINY_SIMCLR[2:16],
    "moco": [
        "--config",
        str(REPO / "configs/moco/cifar10.yaml"),
        "--model.init_args.backbone.name",
        "small_cnn",
        "--model.init_args.backbone.width",
        "8",
        "--model.init_args.proj_hidden",
        "16",
        "--model.init_args.queue_size",
        "32",
    ],
}
COMMON = [
    "--config",
    str(REPO / "configs/trainer/cpu.yaml"),
    "--data.batch_size",
    "8",
    "--trainer.max_steps",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.logger",
    "false",
]


@pytest.mark.parametrize("method", ["relative_location", "simclr", "moco"])
@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_every_stage_pretrains_on_an_unlabeled_folder(
    method: str, layout: str, request: pytest.FixtureRequest, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    root = request.getfixturevalue(layout)
    args = [
        "fit",
        *METHOD_ARGS[method],
        *COMMON,
        "--data.root",
        str(root),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_checkpointing",
        "true",
    ]
    cli = SelfsupCLI(args)
    assert cli.trainer.global_step == 2
    assert not cli.datamodule.has_labels and len(cli.datamodule.train_set) == 51  # 64 minus 20% held out
    weights = [p for p in cli.model.backbone.parameters()]
    assert all(torch.isfinite(p).all() for p in weights)
    out, err = capfd.readouterr()
    assert "64 images, unlabeled" in out
    if method != "relative_location":
        assert "online evaluation off: the pretraining images have no labels" in out + err
        # The class count linked from the unlabeled data is None: no head is built.
        assert cli.model.hparams.num_classes is None and cli.model.online.head is None


def test_fit_with_separate_labeled_evaluation_data(flat: Path, image_folder: Path, tmp_path: Path) -> None:
    args = [
        "fit",
        *METHOD_ARGS["simclr"],
        *COMMON,
        "--data.root",
        str(flat),
        "--data.eval_root",
        str(image_folder),
        "--model.init_args.online.knn_every",
        "1",
        "--model.init_args.online.knn_k",
        "10",
        "--trainer.max_steps",
        "-1",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    cli = SelfsupCLI(args)
    m = cli.trainer.callback_metrics
    # The monitor ran on the labeled root: 3 classes, so accuracies are fractions of its 30 eval images.
    assert {"val/knn_top1", "val/online_top1", "val/loss"} <= set(m)
    for key in ("val/knn_top1", "val/online_top1"):
        assert 0 <= float(m[key]) <= 1 and float(m[key]) * 30 == pytest.approx(round(float(m[key]) * 30), abs=1e-4)
    ev = cli.datamodule.evaluation_data
    assert ev is not cli.datamodule and ev.num_classes == 3 and len(ev.eval_set) == 30


def test_probe_without_labels_and_too_small_images_fail_in_one_line(
    flat: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for config, extra, expected in [
        ("linear_probe", ["--data.root", str(flat)], "LinearProbe trains on labels"),
        ("finetune", ["--data.root", str(flat)], "--data.labels folders"),
        (
            "relative_location",
            ["--data.root", str(image_folder), "--data.image_size", "24"],
            "needs images of at least 32 px",
        ),
    ]:
        code, out, err = run_main(
            [
                "fit",
                *COMMON,
                "--config",
                str(REPO / f"configs/{config}/cifar10.yaml"),
                "--model.init_args.backbone.name",
                "small_cnn",
                *extra,
            ],
            capsys,
        )
        assert code == 2 and "Traceback" not in err, err
        (line,) = [x for x in err.splitlines() if x.startswith("selfsup: error:")]
        assert expected in line


# -- the pipeline: pretrain on one root, evaluate on another ----------------------------------------
PIPE_TINY = [
    "--backbone.width",
    "8",
    "--data.batch_size",
    "16",
    "--stages.relative_location.max_epochs",
    "1",
    "--stages.simclr.max_epochs",
    "1",
    "--evaluations.linear.max_epochs",
    "2",
    "--stages.relative_location.model",
    '{"head_hidden": 16}',
    "--stages.simclr.model",
    '{"optimizer": {"name": "adam", "lr": 0.002}, "proj_hidden": 16}',
    "--stages.relative_location.probe_stages",
    "[]",
    "--wandb.enabled",
    "false",
]


def test_pipeline_pretrains_unlabeled_and_probes_a_labeled_root(tmp_path: Path, image_folder: Path) -> None:
    photos = write_unlabeled(tmp_path / "photos", 64, nested=True)
    (photos / "2019" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    s = pipeline_main(
        [
            "--config",
            str(REPO / "configs/pipeline/quickstart.yaml"),
            "--data.root",
            str(photos),
            "--data.eval_root",
            str(image_folder),
            "--out",
            str(out),
            *PIPE_TINY,
        ]
    )
    assert s["data_root"] == str(photos.resolve()) and s["eval_root"] == str(image_folder.resolve())
    assert s["labels"] == "none" and s["num_classes"] == 3
    assert (s["pretrain_images"], s["train_images"], s["eval_images"]) == (51, 120, 30)
    assert s["images"] == {"used": 64 + 150, "skipped": 1, "skipped_list": "bad_files.txt"}
    assert (out / "bad_files.txt").read_text().startswith(str(photos / "2019" / "broken.jpg"))
    assert set(s["results"]) == {"random", "relative_location", "simclr"}
    assert json.loads((out / "summary.json").read_text())["eval_root"] == s["eval_root"]
    table = (out / "summary.md").read_text()
    assert (
        f"evaluated on {s['eval_root']}" in table and "(unlabeled)" in table and "1 unreadable files skipped" in table
    )


def test_pipeline_without_any_labels_leaves_the_evaluations_out(
    flat: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    s = pipeline_main(
        [
            "--config",
            str(REPO / "configs/pipeline/quickstart.yaml"),
            "--data.root",
            str(flat),
            "--out",
            str(out),
            *PIPE_TINY,
        ]
    )
    said = capsys.readouterr().out
    assert "has no labels" in said and "--data.eval_root" in said  # how to get accuracies, in one line
    assert not list(out.glob("*_probe")) and not list(out.glob("*_knn"))  # no evaluation ran
    assert s["verdict"]["signal"] == "rankme"


# -- one decode per job ---------------------------------------------------------------------------
def _decode_in_process(root: str, cache: str, queue: mp.Queue) -> None:
    from selfsup.data.cache import decode_split
    from selfsup.data.folders import resolve_labels, scan_folder

    scan = scan_folder(Path(root))
    images, report = decode_split(scan, resolve_labels(scan, "none"), None, 32, Path(cache), use_cache=True, workers=1)
    queue.put((report.seconds is not None, images.images.sum().item(), len(images)))


def test_concurrent_processes_decode_once_and_share_the_result(flat: Path, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_decode_in_process, args=(str(flat), str(tmp_path / "cache"), q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(decoded for decoded, _, _ in results) == 1  # one built it under the lock, two read it
    assert len({(s, n) for _, s, n in results}) == 1  # the same pixels everywhere
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_two_process_ddp_job_decodes_each_image_once(nested: Path, tmp_path: Path) -> None:
    """torchrun starts both processes at once: one decodes each split, the other reads it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, NPROC_PER_NODE="2", OMP_NUM_THREADS="1", SELFSUP_CACHE=str(tmp_path / "cache"))
    p = subprocess.run(
        [
            "bash",
            str(REPO / "scripts/torchrun.sh"),
            *METHOD_ARGS["simclr"],
            *COMMON,
            "--data.root",
            str(nested),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    decoded = [x for x in p.stdout.splitlines() if "data: decoded" in x]
    assert len(decoded) == 2, p.stdout  # the training part and the held-out part, once each for the job
    assert sum("decoded 51 images" in x for x in decoded) == 1 and sum("decoded 13 images" in x for x in decoded) == 1
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert "global_batch=16" in p.stdout  # both processes trained: 2 x 8
