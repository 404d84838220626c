"""Real 2-process DDP on CPU (gloo) through the Lightning Trainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_ddp_two_processes_disjoint_shards_and_global_batch(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    p = subprocess.run([sys.executable, str(HERE / "ddp_simclr_script.py"), str(image_folder), str(out), "simclr"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / f"simclr_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and r["torch_world_size"] == 2
        assert set(r["global_batches"]) == {20}  # 10 per rank, the loss sees both ranks' views
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 6
    a, b = (set(r["indices"]) for r in ranks)
    assert a.isdisjoint(b)
    assert sorted(a | b) == list(range(ranks[0]["num_train"]))  # every image once per epoch
    # kNN accuracy is synchronised: both ranks report the same figure.
    assert ranks[0]["knn_top1"] == ranks[1]["knn_top1"]


@pytest.mark.slow
def test_ddp_moco_queue_holds_keys_of_both_ranks(image_folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE), "MASTER_PORT": str(28500 + os.getpid() % 1000)}
    p = subprocess.run([sys.executable, str(HERE / "ddp_simclr_script.py"), str(image_folder), str(tmp_path), "moco"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"moco_rank{r}.json").read_text()) for r in (0, 1)]
    # 6 steps x 10 keys x 2 ranks = 120 keys through a queue of 50: identical on both ranks.
    assert ranks[0]["queue_ptr"] == ranks[1]["queue_ptr"] == 120 % 50
    assert ranks[0]["queue"] == ranks[1]["queue"]
