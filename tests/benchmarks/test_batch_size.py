"""``python -m benchmarks batch_size`` end to end on a few real images (moved from tests/system/test_cluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO


def test_batch_size_experiment(image_folder: Path, tmp_path: Path) -> None:
    """The experiment runs end to end on real images and its three policies set the rates they claim."""
    out = tmp_path / "bs"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "batch_size",
            "--root",
            str(image_folder),
            "--batches",
            "8",
            "32",
            "--epochs",
            "2",
            "--train-images",
            "96",
            "--eval-images",
            "30",
            "--width",
            "4",
            "--base-lr",
            "0.1",
            "--reference",
            "16",
            "--warmup-epochs",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]

    written = json.loads((out / "results.json").read_text())
    assert written["machine"]["cores"] >= 1 and written["commit"]["hash"]
    res = {(r["batch"], r["policy"]): r for r in written["results"]}
    assert len(res) == 6
    for bs in (8, 32):
        assert res[bs, "fixed"]["peak_lr"] == pytest.approx(0.1)
        assert res[bs, "linear"]["peak_lr"] == pytest.approx(0.1 * bs / 16)
        warm = res[bs, "linear+warmup"]
        assert warm["lrs"][0] == 0.0 and warm["peak_lr"] == pytest.approx(0.1 * bs / 16)
        assert res[bs, "fixed"]["steps"] == 2 * 96 // bs  # a fixed number of epochs: fewer steps as the batch grows

    for name in ("batch_size.png", "lr_curves.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 400

    # The figures again from the written results alone (e.g. drawn off the GPU machine that ran them).
    again = tmp_path / "again"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "batch_size",
            "--plot-from",
            str(out / "results.json"),
            "--out",
            str(again),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert {f.name for f in again.iterdir()} == {"batch_size.png", "lr_curves.png"}
