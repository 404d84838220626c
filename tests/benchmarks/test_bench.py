"""``python -m benchmarks lightly`` end to end at toy size: selfsup and lightly side by side, JSON and table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.against_lightly import comparison

from conftest import REPO


def test_bench_writes_the_comparisons_against_lightly(tmp_path: Path) -> None:
    pytest.importorskip("lightly")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "lightly",
            "--images",
            "512",  # views are timed in batches of 512
            "--batch-size",
            "16",
            "--steps",
            "6",
            "--rounds",
            "1",
            "--width",
            "8",
            "--hidden",
            "32",
            "--workers",
            "1",
            "--skip-probe",
            "--precision",
            "bf16-mixed",  # emulated where the CPU lacks bf16: the same rows anywhere
            "--json",
            str(tmp_path / "bench.json"),
            "--markdown",
            str(tmp_path / "bench.md"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    by_name = {c["name"]: c for c in result["comparisons"]}
    assert list(by_name) == [
        "data_pipeline",
        "data_pipeline_compiled",
        "simclr_step",
        "simclr_step_vs_compute",
        "simclr_step_fp32",
        "simclr_step_vs_compute_fp32",
    ]
    for c in result["comparisons"]:
        assert c["ours"] > 0 and c["theirs"] > 0 and c["ratio"] == pytest.approx(c["ours"] / c["theirs"])
        # The four targets on its four names; the other rows are for reading only.
        if c["name"] in ("data_pipeline", "simclr_step", "simclr_step_vs_compute"):
            assert c["target"] is not None and c["met"] == (c["ratio"] >= c["target"])
        else:
            assert c["target"] is None and c["met"] is None
        assert c["ours_peak_mb"] >= 0 and c["theirs_peak_mb"] >= 0
        assert [(r["ours"], r["theirs"]) for r in c["rounds"]] == [(c["ours"], c["theirs"])]  # one round
    assert by_name["simclr_step"]["precision"] == "bf16-mixed" and by_name["simclr_step_fp32"]["precision"] == "32-true"
    assert result["machine"]["cores"] >= 1 and result["machine"]["allocator"]
    assert result["machine"]["compile_fell_back"] == [] and result["machine"]["torch"]
    assert result["commit"]["hash"]
    table = (tmp_path / "bench.md").read_text()
    assert "| data_pipeline |" in table and table in p.stdout
    assert f"commit {result['commit']['hash']}" in table.splitlines()[0]


def test_a_comparison_reports_its_round_with_the_median_ratio() -> None:
    """Rounds run both sides back to back; the reported round is the one whose ratio is the
    median (the lower one of an even count), times compared the other way round."""
    c = comparison(
        "simclr_step",
        [(200.0, 5.0), (400.0, 7.0), (330.0, 1.0)],
        [(100.0, 2.0), (100.0, 3.0), (300.0, 9.0)],
        "images/s",
    )
    assert [r["ratio"] for r in c["rounds"]] == [2.0, 4.0, 1.1]
    assert (c["ours"], c["theirs"], c["ratio"]) == (200.0, 100.0, 2.0) and c["met"] is True
    assert (c["ours_peak_mb"], c["theirs_peak_mb"]) == (7.0, 9.0)
    t = comparison(
        "linear_probe", [(10.0, 0.0), (20.0, 0.0)], [(150.0, 0.0), (100.0, 0.0)], "s", higher_is_better=False
    )
    assert [r["ratio"] for r in t["rounds"]] == [15.0, 5.0]
    assert (t["ours"], t["theirs"], t["ratio"], t["met"]) == (20.0, 100.0, 5.0, False)
