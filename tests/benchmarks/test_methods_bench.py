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


def test_methods_benchmark_takes_dino_and_mae_on_a_vit(tmp_path: Path) -> None:
    vit = ["--backbone", "timm:vit_tiny_patch16_224", "--image-size", "32", "--patch-size", "8"]
    vit += ["--timm-kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2}', "--methods", "simclr,dino,mae"]
    args = [*vit, "--hidden", "32", "--images", "128", "--batch-size", "16", "--steps", "4", "--rounds", "1"]
    result = main([*args, "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md")])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["simclr", "dino", "mae"]
    # DINO: 2 global crops through student and teacher, 6 local ones through the student: more
    # FLOPs than SimCLR's two views. (MAE's decoder outweighs this toy encoder: no order here.)
    assert rows["dino"]["flops_ratio"] > 1.2 and rows["mae"]["flops_per_image"] > 0
    assert "at 32 px, patch 8" in (tmp_path / "m.md").read_text()
