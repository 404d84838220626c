"""``python -m benchmarks probe`` end to end at toy size: both probes run and the comparison is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def test_bench_probe_writes_the_comparison(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "probe",
            "--backbone",
            "small_cnn",
            "--width",
            "8",
            "--train-images",
            "300",
            "--eval-images",
            "100",
            "--epochs",
            "2",
            "--json",
            str(tmp_path / "probe.json"),
            "--out",
            str(tmp_path / "runs"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads((tmp_path / "probe.json").read_text())
    (c,) = result["comparisons"]
    assert (c["name"], c["unit"]) == ("linear_probe", "s")
    assert c["ours"] == result["ours"]["seconds"] > 0 and c["ratio"] == pytest.approx(c["theirs"] / c["ours"])
    # The classic probe trains with the setting the search chose for ours.
    assert result["ours"]["lr"] in result["setup"]["search"]["lrs"]
    assert 0 <= result["classic"]["top1"] <= 1 and result["setup"]["train_images"] == 300
    assert result["machine"]["cores"] >= 1 and result["commit"]["hash"]
    assert "x faster" in p.stdout and "| classic: augmented images" in p.stdout
