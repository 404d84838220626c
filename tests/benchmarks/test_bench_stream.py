"""``python -m benchmarks stream`` end to end at toy size: the memory runs, the loaders side by side and
the comparisons written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_image_folder


def test_bench_stream_writes_the_comparisons(tmp_path: Path) -> None:
    pytest.importorskip("litdata")
    src = write_image_folder(tmp_path / "images", {"train": 60})  # 180 real JPEGs
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    pngs_before = set(REPO.glob("*.png"))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "stream",
            "--src",
            str(src / "train"),
            "--images",
            "40",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--batches",
            "2",
            "--rounds",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(tmp_path / "stream.json"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "stream.json").read_text())
    m = result["memory"]
    # 1x and 4x the images, each source: the same steps, the training set as large as asked.
    assert [m[k]["images"] for k in ("stream_1x", "folder_1x", "stream_4x", "folder_4x")] == [36, 36, 144, 144]
    assert all(m[k]["steps"] == 2 and m[k]["peak_rss_mb"] > 100 for k in ("stream_1x", "stream_4x"))
    assert m["stream_growth"] == pytest.approx(m["stream_4x"]["peak_rss_mb"] / m["stream_1x"]["peak_rss_mb"])
    names = [c["name"] for c in result["comparisons"]]
    assert names == ["stream_loader", "stream_peak_memory_4x_over_1x"]
    t = result["throughput"]
    assert t["torchvision"]["ratio"] == 1 and t["selfsup"]["images_per_s"] > 0
    assert result["comparisons"][0]["ratio"] == pytest.approx(t["selfsup"]["ratio"])
    assert "throughput: selfsup" in p.stdout and "memory: peak at 4x / peak at 1x" in p.stdout
    # Figures of the runs stay in the work folder, not where the benchmark was started.
    assert set(REPO.glob("*.png")) == pngs_before and not list(tmp_path.glob("*.png"))
