"""The verdict's paired tests against hand computations (exact binomial sums, a per-resample loop,
the normal approximation) and its decisions on constructed cases."""

from __future__ import annotations

import ast
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from selfsup.evaluation import verdict as verdict_module
from selfsup.evaluation.verdict import (
    bootstrap_indices,
    compare,
    mcnemar,
    paired_bootstrap,
    rank_by_rankme,
    verdict,
)


def pair(both: int, a_only: int, b_only: int, neither: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness of two classifiers with the given contingency counts, in a shuffled image order."""
    a = torch.tensor([True] * both + [True] * a_only + [False] * b_only + [False] * neither)
    b = torch.tensor([True] * both + [False] * a_only + [True] * b_only + [False] * neither)
    perm = torch.randperm(a.numel(), generator=torch.Generator().manual_seed(seed))
    return a[perm], b[perm]


def exact_p(k: int, n: int) -> float:
    """Two-sided exact binomial p-value with integers and fractions, straight from the definition."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def hand_percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), written out."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


# McNemar (1947), exact.


def test_mcnemar_small_case_by_hand() -> None:
    a, b = pair(both=20, a_only=6, b_only=1, neither=13)
    m = mcnemar(a, b)
    assert (m.b_only, m.a_only) == (1, 6)
    # 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    assert m.p_value == pytest.approx(0.125, rel=1e-12)


def test_mcnemar_is_symmetric_and_takes_lists_and_arrays() -> None:
    a, b = pair(both=5, a_only=9, b_only=3, neither=4)
    ab, ba = mcnemar(a, b), mcnemar(b.tolist(), np.asarray(a))
    assert (ab.b_only, ab.a_only) == (ba.a_only, ba.b_only) == (3, 9)
    assert ab.p_value == pytest.approx(ba.p_value, rel=1e-12)
    assert ab.p_value == pytest.approx(exact_p(3, 12), rel=1e-10)


def test_mcnemar_without_discordant_pairs_is_one() -> None:
    a, b = pair(both=30, a_only=0, b_only=0, neither=10)
    assert mcnemar(a, b).p_value == 1.0
    # Balanced discordance: the two-sided sum exceeds 1 and is clipped to it.
    a, b = pair(both=3, a_only=4, b_only=4, neither=3)
    assert mcnemar(a, b).p_value == 1.0


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 20), (3, 40), (100, 300), (140, 300), (1, 2)])
def test_mcnemar_matches_exact_integer_sums(k: int, n: int) -> None:
    a, b = pair(both=7, a_only=n - k, b_only=k, neither=5)
    assert mcnemar(a, b).p_value == pytest.approx(exact_p(k, n), rel=1e-9, abs=1e-300)


def test_mcnemar_large_n_is_finite_and_near_the_normal_approximation() -> None:
    a, b = pair(both=1000, a_only=24_700, b_only=25_300, neither=1000)
    m = mcnemar(a, b)
    assert math.isfinite(m.p_value) and 0 < m.p_value < 1
    # Normal approximation with continuity correction: z = (|b - c| - 1) / sqrt(b + c).
    z = (600 - 1) / math.sqrt(50_000)
    assert m.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.02)


def test_mcnemar_rejects_different_image_counts() -> None:
    with pytest.raises(ValueError, match="same evaluation images"):
        mcnemar(torch.ones(5, dtype=torch.bool), torch.ones(6, dtype=torch.bool))


# Paired bootstrap (Efron & Tibshirani 1993).


def random_pair(n: int, pa: float, pb: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    # Correlated like two backbones on one set: both see the same easy and hard images.
    return u < pa, (u + 0.3 * torch.rand(n, generator=g)) < pb + 0.15


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    a, b = random_pair(500, 0.6, 0.65, seed=1)
    first = paired_bootstrap(a, b, samples=2000, seed=3)
    assert paired_bootstrap(a, b, samples=2000, seed=3) == first
    assert paired_bootstrap(a, b, samples=2000, seed=4) != first


def test_bootstrap_difference_and_interval_contain_the_observed() -> None:
    a, b = random_pair(800, 0.5, 0.55, seed=2)
    iv = paired_bootstrap(a, b, samples=3000)
    observed = (int(b.sum()) - int(a.sum())) / 800
    assert iv.difference == pytest.approx(observed, abs=1e-12)
    assert iv.low <= iv.difference <= iv.high
    assert iv.low < iv.high


def test_bootstrap_of_identical_vectors_is_zero() -> None:
    a, _ = random_pair(300, 0.7, 0.7, seed=5)
    iv = paired_bootstrap(a, a.clone(), samples=500)
    assert (iv.difference, iv.low, iv.high) == (0.0, 0.0, 0.0)
    assert not iv.excludes_zero


def test_bootstrap_matches_a_slow_loop_over_the_same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks, so that the chunked path (several chunks, a partial last one) is what runs.
    monkeypatch.setattr(verdict_module, "CHUNK_ELEMENTS", 7 * 60)
    a, b = random_pair(60, 0.5, 0.6, seed=6)
    samples, seed = 200, 11
    draws = torch.cat(list(bootstrap_indices(60, samples, seed)))
    assert draws.shape == (samples, 60)
    la, lb = a.tolist(), b.tolist()
    diffs = []
    for row in draws.tolist():
        diffs.append(sum(lb[i] for i in row) / 60 - sum(la[i] for i in row) / 60)
    iv = paired_bootstrap(a, b, samples=samples, seed=seed, level=0.9)
    assert iv.low == pytest.approx(hand_percentile(diffs, 0.05), abs=1e-12)
    assert iv.high == pytest.approx(hand_percentile(diffs, 0.95), abs=1e-12)


def test_bootstrap_width_matches_the_normal_approximation() -> None:
    n = 2000
    a, b = random_pair(n, 0.6, 0.62, seed=7)
    iv = paired_bootstrap(a, b, samples=10000)
    d = b.double() - a.double()
    se = math.sqrt(d.var(unbiased=False).item() / n)
    assert iv.high - iv.low == pytest.approx(2 * 1.959964 * se, rel=0.15)


# The comparison's significance rule: interval excludes 0 AND exact McNemar p < 0.05.


def test_few_discordant_images_need_the_exact_test_too() -> None:
    # 5 images for b, none against: p = 2 / 2^5 = 0.0625, though the resampled count of those 5
    # images is 0 only ~e^-5 = 0.7% of the time, so the percentile interval excludes 0.
    a, b = pair(both=600, a_only=0, b_only=5, neither=395)
    c = compare(a, b, "simclr", "start")
    assert c.low > 0 and c.p_value == pytest.approx(0.0625)
    assert not c.significant and not c.better
    # One more: p = 2 / 2^6 = 0.03125 < 0.05, and both agree.
    a, b = pair(both=600, a_only=0, b_only=6, neither=394)
    c = compare(a, b, "simclr", "start")
    assert c.p_value == pytest.approx(0.03125) and c.low > 0
    assert c.significant and c.better


def test_a_significant_loss_is_not_better() -> None:
    a, b = pair(both=500, a_only=80, b_only=10, neither=410)
    c = compare(a, b, "simclr", "start")
    assert c.significant and not c.better and c.high < 0
    assert (c.gained, c.lost) == (10, 80)


# The verdict.

DISPLAY = {"simclr": "SimCLR", "relative_location": "relative location"}


def test_verdict_keeps_the_start_when_the_stage_gets_the_same_images() -> None:
    start, random = pair(both=300, a_only=300, b_only=50, neither=350)
    v = verdict({"random": random, "start": start, "simclr": start.clone()}, "linear", display=DISPLAY)
    assert v.best == "start" and v.leader == "start"  # a tie goes to the start
    assert "keep the starting weights" in v.text
    assert "1000 images, linear probe" in v.text


def test_verdict_keeps_the_start_when_the_stage_is_one_image_better() -> None:
    start, stage = pair(both=600, a_only=0, b_only=1, neither=399)
    v = verdict({"start": start, "simclr": stage}, "knn", display=DISPLAY)
    assert v.leader == "simclr" and v.best == "start"
    assert "No pretraining stage beats the start".lower() in v.text.lower()
    assert "keep the starting weights" in v.text
    assert "+0.1 points" in v.text and "McNemar p = 1" in v.text
    assert "kNN" in v.text
    [c] = v.comparisons
    assert not c.significant and c.reference == "start" and c.backbone == "simclr"


def test_verdict_exports_a_stage_that_is_clearly_better() -> None:
    n = 1000
    start, stage = pair(both=550, a_only=20, b_only=120, neither=310)
    random = torch.arange(n) % 3 == 0
    v = verdict({"random": random, "start": start, "simclr": stage}, "linear", display=DISPLAY)
    assert v.best == "simclr" and v.leader == "simclr"
    # Accuracies by hand: 670 / 1000 for the stage, 570 / 1000 for the start: +10.0 points.
    assert v.scores["simclr"] == pytest.approx(0.67) and v.scores["start"] == pytest.approx(0.57)
    assert "SimCLR is best: 67.0% top-1, +10.0 points over the start" in v.text
    assert "beyond the evaluation's noise" in v.text and "random initialization" in v.text
    vs_start, vs_random = v.comparisons
    assert vs_start.reference == "start" and vs_random.reference == "random"
    assert vs_start.better and vs_start.gained == 120 and vs_start.lost == 20
    assert f"{100 * vs_start.low:+.1f} to {100 * vs_start.high:+.1f}" in v.text
    assert 0.05 < vs_start.low < 0.1 < vs_start.high < 0.15
    # 100 more right than wrong out of 140 discordant: far beyond 0.05.
    assert vs_start.p_value == pytest.approx(exact_p(20, 140), rel=1e-9)
    assert "McNemar p < 0.0001" in v.text


def test_verdict_without_a_start_compares_against_random_init() -> None:
    random, stage = pair(both=200, a_only=30, b_only=200, neither=570)
    v = verdict({"random": random, "simclr": stage, "relative_location": random.clone()}, "linear", display=DISPLAY)
    assert v.best == "simclr"
    assert [c.reference for c in v.comparisons] == ["random"]
    assert "over random initialization" in v.text and "the start" not in v.text
    # Nothing beats random init: pretraining did not help, and random init is what is kept.
    v = verdict({"random": random, "relative_location": random.clone()}, "linear", display=DISPLAY)
    assert v.best == "random" and "did not help" in v.text


def test_verdict_with_one_backbone() -> None:
    start, stage = pair(both=40, a_only=10, b_only=5, neither=45)
    v = verdict({"start": start}, "linear")
    assert v.best == "start" and "keep the starting weights" in v.text and v.comparisons == []
    v = verdict({"simclr": stage}, "linear", display=DISPLAY)
    assert v.best == "simclr" and "only backbone" in v.text and "45.0% top-1" in v.text


def test_verdict_ties_between_stages_go_to_the_earlier_entry() -> None:
    start, stage = pair(both=500, a_only=0, b_only=100, neither=400)
    other = stage.roll(1)  # other images, same accuracy
    v = verdict({"start": start, "relative_location": other, "simclr": stage}, "linear", display=DISPLAY)
    assert v.leader == "relative_location"


def test_verdict_reports_random_init_beating_the_start() -> None:
    start, random = pair(both=300, a_only=10, b_only=150, neither=540)
    v = verdict({"random": random, "start": start, "simclr": start.clone()}, "linear")
    assert v.best == "random" and "starting weights do not help" in v.text


def test_verdict_as_dict_is_json() -> None:
    start, stage = pair(both=550, a_only=20, b_only=120, neither=310)
    v = verdict({"start": start, "simclr": stage}, "linear", samples=500)
    d = json.loads(json.dumps(v.as_dict()))
    assert d["best"] == "simclr" and d["n_images"] == 1000 and d["comparisons"][0]["samples"] == 500
    assert d["comparisons"][0]["gained"] == 120


def test_verdict_rejects_different_image_counts() -> None:
    with pytest.raises(ValueError, match="different numbers"):
        verdict({"start": torch.ones(3, dtype=torch.bool), "simclr": torch.ones(4, dtype=torch.bool)}, "linear")


# RankMe (Garrido et al. 2023), label-free.


def test_rankme_picks_the_highest_and_says_it_is_weaker_than_labels() -> None:
    v = rank_by_rankme({"random": 12.0, "start": 300.0, "simclr": 420.0}, display=DISPLAY)
    assert v.best == "simclr" and v.signal == "rankme" and v.comparisons == []
    assert "weaker than labels" in v.text and "label-free" in v.text and "SimCLR" in v.text
    assert "+40.0% over the start" in v.text  # 420 / 300 - 1


def test_rankme_near_tie_keeps_the_start() -> None:
    v = rank_by_rankme({"start": 300.0, "simclr": 302.9})  # within 1% (303)
    assert v.best == "start" and v.leader == "simclr" and "keep the starting weights" in v.text
    v = rank_by_rankme({"start": 300.0, "simclr": 303.1})
    assert v.best == "simclr"


def test_rankme_without_start_and_nonfinite_values() -> None:
    v = rank_by_rankme({"simclr": float("nan"), "relative_location": 50.0}, display=DISPLAY)
    assert v.best == "relative_location"


# Layering: plain torch and python, like the other evaluation math (tests/unit/test_layout.py).


def test_verdict_imports_no_lightning_and_no_stages() -> None:
    tree = ast.parse(open(verdict_module.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.startswith(("lightning", "pytorch_lightning", "selfsup"))]
