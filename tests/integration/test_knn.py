"""kNN evaluation: the chunked search against a brute-force reference, and the evaluation stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import read_image

from selfsup.cli import SelfsupCLI
from selfsup.evaluation.knn import knn_scores, knn_scores_multi
from selfsup.evaluation.online import OnlineEvaluation, OnlineSpec

REPO = Path(__file__).resolve().parents[2]


def brute_force(
    query: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, t: float
) -> torch.Tensor:
    """One query at a time, every bank entry's cosine similarity, sorted, the top k vote."""
    out = torch.zeros(len(query), num_classes, dtype=torch.float64)
    for i, q in enumerate(query.double()):
        sims = [(float(q @ b / (q.norm() * b.norm())), int(y)) for b, y in zip(bank.double(), labels, strict=True)]
        for s, y in sorted(sims, reverse=True)[:k]:
            out[i, y] += torch.exp(torch.tensor(s / t, dtype=torch.float64))
    return out


@pytest.mark.parametrize("k", [1, 5, 20])
def test_chunked_knn_equals_brute_force(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    query, bank = torch.randn(23, 6, generator=g), torch.randn(157, 6, generator=g)
    labels = torch.randint(0, 4, (157,), generator=g)
    reference = brute_force(query, bank, labels, 4, k, 0.1)
    whole = knn_scores(query, bank, labels, 4, k=k, temperature=0.1, query_chunk=10**6, bank_chunk=10**6)
    chunked = knn_scores(query, bank, labels, 4, k=k, temperature=0.1, query_chunk=5, bank_chunk=11)
    assert torch.allclose(whole.double(), reference, rtol=1e-4)
    assert torch.allclose(chunked.double(), reference, rtol=1e-4)
    assert torch.equal(chunked.argmax(1), reference.argmax(1))


def test_several_k_from_one_search_and_a_bank_smaller_than_k() -> None:
    g = torch.Generator().manual_seed(0)
    query, bank = torch.randn(9, 5, generator=g), torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    multi = knn_scores_multi(query, bank, labels, 3, ks=(20, 3, 200), bank_chunk=7)
    for k in (20, 3):
        assert torch.allclose(multi[k], knn_scores(query, bank, labels, 3, k=k))
    assert torch.allclose(multi[200], brute_force(query, bank, labels, 3, 30, 0.1).float(), rtol=1e-4)  # all 30


def test_online_monitor_uses_the_whole_training_split_by_default() -> None:
    assert OnlineEvaluation(OnlineSpec(), 8, 3).knn_bank_size is None


def test_knn_evaluation_stage_through_selfsup_validate(image_folder: Path, tmp_path: Path) -> None:
    cli = SelfsupCLI(
        [
            "validate",
            "--config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--config",
            str(REPO / "configs/knn/cifar10.yaml"),
            "--model.init_args.backbone.name",
            "small_cnn",
            "--model.init_args.backbone.width",
            "8",
            "--model.init_args.k",
            "[10, 3]",
            "--data.root",
            str(image_folder),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    m = cli.trainer.callback_metrics
    assert set(m) == {"val/top1", "val/top1_k3"}  # 3 classes: no top-5
    assert cli.model._bank[0].shape[0] == len(cli.datamodule.train_set) == 120  # the whole training split
    # The same figure from the functions the stage is built on, computed here directly.
    dm, model = cli.datamodule, cli.model
    bank, labels = model._bank
    feats = model.embed(dm.eval_set.images)
    expected = (knn_scores(feats, bank, labels, 3, k=10).argmax(1) == dm.eval_set.labels).float().mean()
    assert float(m["val/top1"]) == pytest.approx(float(expected), abs=1e-6)
    # The picture: 8 evaluation images, each with its 8 nearest training images (32 px, doubled).
    grid = read_image(str(tmp_path / "val_neighbors.png"))
    assert grid.shape[0] == 3 and grid.shape[1] >= 8 * 64 and grid.shape[2] >= 9 * 64
