"""``python -m benchmarks methods`` at toy size: the three methods side by side, JSON and table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.methods import main


def test_methods_benchmark_writes_each_method_against_simclr(tmp_path: Path) -> None:
    args = ["--width", "8", "--hidden", "32", "--images", "128", "--batch-size", "16", "--steps", "5"]
    result = main([*args, "--rounds", "1", "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md")])
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == result["rows"]
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["simclr", "byol", "vicreg"]
    assert rows["simclr"]["ratio_to_simclr"] == rows["simclr"]["predicted_ratio"] == 1.0
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["compute_s"] > 0 and len(r["rounds"]) == 1
        (one,) = r["rounds"]  # one round: its figures are the medians
        assert one["measured_over_predicted"] == pytest.approx(one["ratio"] / one["predicted"])
        assert r["measured_over_predicted"] == one["measured_over_predicted"]
    # BYOL adds a predictor and a target forward pass: more FLOPs than SimCLR on the same network.
    assert rows["byol"]["flops_ratio"] > 1.1
    table = (tmp_path / "m.md").read_text()
    assert "| byol |" in table and "| vicreg |" in table and "measured / predicted" in table
