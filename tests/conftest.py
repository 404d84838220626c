"""Shared fixtures (real image folders written to a temporary directory, offline W&B) and the
kinds of test, one folder each, selected by marker:

- ``unit``: functions and modules on tensors, no Trainer (seconds in all; ``make check``);
- ``integration``: a real Trainer, the CLI in process, real files (seconds each);
- ``system``: whole commands in subprocesses, 2-process DDP, the pipeline, kills and resumes;
- ``benchmarks``: the benchmarks and experiments at toy size.

``make test`` runs them all; ``pytest -m unit`` (or ``tests/unit``) the fast loop.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from selfsup.data.sources import SAMPLE_ZIP

if TYPE_CHECKING:
    import lightning as L

    from selfsup.data import ImageDataModule

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
KINDS = ("unit", "integration", "system", "benchmarks")
#: `selfsup fit` arguments of a SimCLR run small enough for a test: the CPU trainer, the CIFAR-10
#: config, and a small CNN of width 8 (append the data, the budget and the run folder).
SMALL_SIMCLR = [
    *("--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/simclr/cifar10.yaml")),
    *("--model.init_args.backbone.name", "small_cnn", "--model.init_args.backbone.width", "8"),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its folder's kind, so that ``-m unit`` (or ``-m "not system"``) selects."""
    tests = Path(__file__).resolve().parent
    for item in items:
        kind = Path(item.fspath).resolve().relative_to(tests).parts[0]
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never reach the network, and keep W&B's own files inside the test's folder.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))


def write_image_folder(root: Path, per_class: dict[str, int], classes: int = 3, size: int | None = None) -> Path:
    """Write real CIFAR-10 JPEGs from the embedded sample as ROOT/<split>/<class>/<file>.

    ``per_class`` maps split name to images per class; ``size`` re-saves them at that side.
    """
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(zf.namelist())
        class_names = sorted({n.split("/")[1] for n in names if n.count("/") == 2})[:classes]
        for split, n in per_class.items():
            for c in class_names:
                src = [x for x in names if x.startswith(f"train/{c}/") and x.endswith(".jpg")]
                offset = 0 if split == "train" else 200  # disjoint images per split
                d = root / split / c
                d.mkdir(parents=True, exist_ok=True)
                for name in src[offset : offset + n]:
                    data = zf.read(name)
                    out = d / Path(name).name
                    if size is None:
                        out.write_bytes(data)
                    else:
                        Image.open(io.BytesIO(data)).convert("RGB").resize((size, size)).save(out)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes, 40 train and 10 val images each, 32 px."""
    return write_image_folder(tmp_path / "images", {"train": 40, "val": 10})


def cpu_count() -> int:
    return os.cpu_count() or 1


def cpu_trainer(tmp_path: Path, **kw: object) -> L.Trainer:
    """A plain one-epoch CPU Trainer for a test: no logger, bars or summary (``kw`` overrides)."""
    import lightning as L

    kw = {"max_epochs": 1, **kw}
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def dm(image_folder: Path) -> ImageDataModule:
    """The DataModule of :func:`image_folder` at batch 16."""
    from selfsup.data import ImageDataModule

    return ImageDataModule(root=str(image_folder), batch_size=16)
