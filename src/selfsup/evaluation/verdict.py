"""Did pretraining beat the start, beyond the evaluation's noise? Paired tests of backbones
evaluated on the same images, and the plain-English verdict a pipeline reports.

Every backbone (random init, the starting weights, each pretraining stage) is scored on the same
evaluation images, so the comparisons are paired: what separates two backbones is only the
images one gets right and the other wrong. Two tests read those images:

- the exact McNemar test (McNemar 1947), recommended for comparing two classifiers on one test
  set by Dietterich (1998, "Approximate statistical tests for comparing supervised
  classification learning algorithms");
- a paired percentile bootstrap of the accuracy difference (Efron & Tibshirani 1993, "An
  Introduction to the Bootstrap"), which gives the interval the verdict quotes.

Significance rule: a difference is beyond the evaluation's noise when BOTH the bootstrap interval
at ``level`` excludes 0 AND McNemar's p < 1 - ``level`` (p < 0.05 at the default 95%). Requiring
both keeps the verdict from resting on one test's approximation: the percentile interval can be
too narrow with few discordant images, where the exact test is not.

Plain torch and python (no Lightning): the pipeline and offline reports both use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

#: Per-image correctness: a bool tensor, array or sequence of shape (N,).
Correct = torch.Tensor | np.ndarray | Sequence[bool]

#: Bootstrap index elements drawn at a time (int64 indices plus int8 differences: ~144 MB), so
#: memory stays bounded for any N and number of resamples.
CHUNK_ELEMENTS = 16_000_000

#: Relative margin within which RankMe values count as tied (the start is then preferred).
RANKME_TIE = 0.01

#: How the evaluations read inside a sentence; other names are used as they are.
EVALUATION_NAMES = {"linear": "linear probe", "knn": "kNN", "finetune": "fine-tuning"}

#: How the start and random init read inside a sentence, unless ``display`` names them.
DEFAULT_DISPLAY = {"start": "the start", "random": "random initialization"}


def as_correct(x: Correct) -> torch.Tensor:
    """(N,) bool tensor on the CPU from a tensor, array or sequence of per-image correctness."""
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)).to(torch.bool)
    if t.dim() != 1:
        raise ValueError(f"per-image correctness must have shape (N,), got {tuple(t.shape)}")
    return t


def paired(a: Correct, b: Correct) -> tuple[torch.Tensor, torch.Tensor]:
    """Both correctness vectors as bool tensors, checked to cover the same images."""
    ta, tb = as_correct(a), as_correct(b)
    if ta.shape != tb.shape:
        raise ValueError(f"paired tests need the same evaluation images: {ta.numel()} and {tb.numel()} results")
    if ta.numel() == 0:
        raise ValueError("no evaluation images to compare on")
    return ta, tb


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of two classifiers on the same images (McNemar 1947; Dietterich 1998).

    Attributes:
        b_only: images that b gets right and a wrong.
        a_only: images that a gets right and b wrong.
        p_value: two-sided exact p-value (binomial test of the discordant images with p = 1/2).
    """

    b_only: int
    a_only: int
    p_value: float

    @property
    def discordant(self) -> int:
        """Images on which a and b disagree: the only ones that carry evidence."""
        return self.b_only + self.a_only


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes (or fewer, or as extreme above) in ``n`` fair
    coin flips: min(1, 2 * sum_{i <= min(k, n - k)} C(n, i) / 2^n).

    In log space (lgamma and log-sum-exp in float64), so n in the hundreds of thousands neither
    overflows nor costs big-integer arithmetic; relative error ~1e-11 at n = 100,000.
    """
    if n == 0:
        return 1.0
    k = min(k, n - k)
    i = torch.arange(k + 1, dtype=torch.float64)
    log_terms = math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) - n * math.log(2.0)
    return min(1.0, 2.0 * math.exp(torch.logsumexp(log_terms, 0).item()))


def mcnemar(a: Correct, b: Correct) -> McNemar:
    """The exact McNemar test of two classifiers' per-image correctness on the same images
    (McNemar 1947): under the null of equal accuracy, each discordant image is equally likely to
    favor a or b. Exact rather than chi-square, as Dietterich (1998) advises when discordant pairs
    are few; p = 1 when there are none."""
    ta, tb = paired(a, b)
    b_only = int((tb & ~ta).sum())
    a_only = int((ta & ~tb).sum())
    return McNemar(b_only=b_only, a_only=a_only, p_value=binomial_two_sided(min(b_only, a_only), b_only + a_only))


@dataclass(frozen=True)
class Interval:
    """A paired-bootstrap percentile interval of acc(b) - acc(a) (Efron & Tibshirani 1993).

    Attributes:
        difference: acc(b) - acc(a) on all images (a fraction, not points).
        low / high: the (1 - level) / 2 and (1 + level) / 2 percentiles over the resamples.
        level: the interval's coverage; samples: the number of resamples.
    """

    difference: float
    low: float
    high: float
    level: float = 0.95
    samples: int = 10000

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside [low, high]."""
        return self.low > 0 or self.high < 0


def bootstrap_indices(n: int, samples: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The resampled image indices of :func:`paired_bootstrap`: ``samples`` draws of n indices
    with replacement, as (rows, n) int64 chunks of at most :data:`CHUNK_ELEMENTS` elements.
    Deterministic for (n, samples, seed)."""
    g = torch.Generator().manual_seed(seed)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, samples, rows):
        yield torch.randint(0, n, (min(rows, samples - start), n), generator=g)


def percentile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor, linearly interpolated between order statistics (numpy's
    default), in float64."""
    return float(torch.quantile(values.double(), q))


def paired_bootstrap(a: Correct, b: Correct, samples: int = 10000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile interval of acc(b) - acc(a) by the paired bootstrap (Efron & Tibshirani 1993):
    resample the evaluation images with replacement and score both backbones on the SAME resampled
    images, so that what the two share (easy and hard images) cancels and only their disagreements
    vary. Vectorized over resamples, in bounded-memory chunks (:func:`bootstrap_indices`)."""
    if samples < 1:
        raise ValueError(f"the bootstrap needs at least one resample, got {samples}")
    if not 0 < level < 1:
        raise ValueError(f"the interval's level must lie in (0, 1), got {level}")
    ta, tb = paired(a, b)
    n = ta.numel()
    # Per-image difference in {-1, 0, 1}: the resampled accuracy difference is its resampled mean.
    d = tb.to(torch.int8) - ta.to(torch.int8)
    sums = [
        d.index_select(0, idx.view(-1)).view(idx.shape).sum(1, dtype=torch.int64)
        for idx in bootstrap_indices(n, samples, seed)
    ]
    diffs = torch.cat(sums).double() / n
    tail = (1 - level) / 2
    return Interval(
        difference=float(d.sum(dtype=torch.int64)) / n,
        low=percentile(diffs, tail),
        high=percentile(diffs, 1 - tail),
        level=level,
        samples=samples,
    )


@dataclass(frozen=True)
class Comparison:
    """One backbone against a reference on one evaluation, on the same images.

    Attributes:
        evaluation: the evaluation's name (e.g. ``linear``); n_images: the evaluation images.
        backbone / reference: the names compared (e.g. ``simclr`` against ``start``).
        accuracy / reference_accuracy: top-1 accuracies, fractions.
        difference: accuracy - reference_accuracy; low / high: its paired-bootstrap interval.
        level: the interval's coverage; samples: the bootstrap resamples.
        gained / lost: images the backbone gets right and the reference wrong, and the reverse.
        p_value: the exact McNemar p-value.
        significant: beyond the evaluation's noise: the interval excludes 0 AND p < 1 - level
            (the module's rule); in either direction.
    """

    evaluation: str
    backbone: str
    reference: str
    n_images: int
    accuracy: float
    reference_accuracy: float
    difference: float
    low: float
    high: float
    level: float
    samples: int
    gained: int
    lost: int
    p_value: float
    significant: bool

    @property
    def better(self) -> bool:
        """The backbone beats the reference beyond the evaluation's noise."""
        return self.significant and self.low > 0

    def as_dict(self) -> dict[str, Any]:
        """The comparison as plain JSON-ready values."""
        return asdict(self)


def compare(
    reference_correct: Correct,
    correct: Correct,
    backbone: str,
    reference: str,
    evaluation: str = "",
    level: float = 0.95,
    samples: int = 10000,
    seed: int = 0,
) -> Comparison:
    """``backbone`` (per-image ``correct``) against ``reference`` on the same evaluation images:
    the accuracies, the paired-bootstrap interval of the difference and the exact McNemar test."""
    ta, tb = paired(reference_correct, correct)
    interval = paired_bootstrap(ta, tb, samples=samples, seed=seed, level=level)
    test = mcnemar(ta, tb)
    return Comparison(
        evaluation=evaluation,
        backbone=backbone,
        reference=reference,
        n_images=ta.numel(),
        accuracy=float(tb.double().mean()),
        reference_accuracy=float(ta.double().mean()),
        difference=interval.difference,
        low=interval.low,
        high=interval.high,
        level=level,
        samples=samples,
        gained=test.b_only,
        lost=test.a_only,
        p_value=test.p_value,
        significant=interval.excludes_zero and test.p_value < 1 - level,
    )


@dataclass(frozen=True)
class Verdict:
    """Which backbone to export, and why, in one paragraph.

    Attributes:
        evaluation: the evaluation the verdict reads (``rankme`` for :func:`rank_by_rankme`).
        n_images: the evaluation images (0 when unknown, as for RankMe).
        best: the backbone to export: the start (or, without one, random init) unless another
            backbone beats it beyond the evaluation's noise.
        leader: the backbone that scored highest (ties resolved toward the start, then random).
        scores: each backbone's score: top-1 accuracy (a fraction), or RankMe.
        comparisons: the paired comparisons behind the verdict (empty for RankMe).
        text: the verdict as one plain-English paragraph.
        signal: ``labels`` (accuracy on labeled evaluation images) or ``rankme`` (label-free).
    """

    evaluation: str
    n_images: int
    best: str
    leader: str
    scores: dict[str, float]
    text: str
    comparisons: list[Comparison] = field(default_factory=list)
    signal: Literal["labels", "rankme"] = "labels"

    def as_dict(self) -> dict[str, Any]:
        """The verdict as plain JSON-ready values, comparisons included."""
        return {
            "evaluation": self.evaluation,
            "n_images": self.n_images,
            "best": self.best,
            "leader": self.leader,
            "scores": dict(self.scores),
            "text": self.text,
            "comparisons": [c.as_dict() for c in self.comparisons],
            "signal": self.signal,
        }


def pick_leader(scores: Mapping[str, float], preferred: Sequence[str | None]) -> str:
    """The highest-scoring name; among equal scores the first of ``preferred`` present, then the
    earliest entry, so that a tie never reads as an improvement over the start."""
    top = max(scores.values())
    tied = [name for name, s in scores.items() if s == top]
    for name in preferred:
        if name in tied:
            return name
    return tied[0]


def points(x: float, signed: bool = True) -> str:
    """A fraction as percentage points with one decimal (``+3.4``), without a ``-0.0``."""
    v = round(100 * x, 1) + 0.0  # + 0.0 turns a rounded -0.0 into 0.0
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def p_text(p: float) -> str:
    """A p-value as the verdict quotes it: two significant digits, floored at 0.0001."""
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.2g}"


def versus(c: Comparison, reference: str) -> str:
    """``+3.4 points over the start (95% interval +2.1 to +4.7, McNemar p = 0.0002: beyond the
    evaluation's noise)``."""
    side = (
        f"{points(c.difference)} points over" if c.difference >= 0 else f"{points(-c.difference, False)} points below"
    )
    noise = "beyond" if c.significant else "within"
    return (
        f"{side} {reference} ({round(100 * c.level):g}% interval {points(c.low)} to {points(c.high)}, "
        f"McNemar {p_text(c.p_value)}: {noise} the evaluation's noise)"
    )


def brief(c: Comparison) -> str:
    """``+0.4 points, 95% interval -0.8 to +1.6, McNemar p = 0.52``."""
    return (
        f"{points(c.difference)} points, {round(100 * c.level):g}% interval {points(c.low)} to {points(c.high)}, "
        f"McNemar {p_text(c.p_value)}"
    )


def sentence_names(
    keys: Sequence[str], start: str | None, random: str | None, display: Mapping[str, str] | None
) -> dict[str, str]:
    """How each backbone reads inside a sentence: ``display``'s name, else the key; the start and
    random init read "the start" and "random initialization" unless ``display`` names them."""
    names = dict(display or {})
    out = {k: names.get(k, k) for k in keys}
    if start is not None:
        out[start] = names.get(start, DEFAULT_DISPLAY["start"])
    if random is not None:
        out[random] = names.get(random, DEFAULT_DISPLAY["random"])
    return out


def verdict(
    correct: Mapping[str, Correct],
    evaluation: str,
    start: str | None = "start",
    random: str | None = "random",
    display: Mapping[str, str] | None = None,
    level: float = 0.95,
    samples: int = 10000,
    seed: int = 0,
) -> Verdict:
    """Which backbone to export after one evaluation, judged against the evaluation's noise.

    The leader is the backbone with the highest accuracy (ties: the start, then random init, then
    the earlier entry). It is compared, on the same images, against the reference, the start (or
    random init when there is no start), and against random init; it is exported only when it
    beats the reference beyond the noise (the module's rule: the paired-bootstrap interval
    excludes 0 and McNemar's p < 1 - level). Otherwise the reference is kept. Only the leader is
    tested against the reference, so that trying every stage does not multiply false alarms.

    Args:
        correct: per backbone name, per-image correctness (N,) on the same evaluation images in
            the same order.
        evaluation: the evaluation's name (``linear``, ``knn``, ``finetune`` read as words).
        start / random: the names of the starting weights and of random init in ``correct``
            (None, or absent from ``correct``: not evaluated).
        display: names as they read inside a sentence (e.g. ``{"simclr": "SimCLR"}``).
        level / samples / seed: the bootstrap interval's coverage, resamples and seed.
    """
    if not correct:
        raise ValueError("no backbones to judge")
    tensors = {name: as_correct(c) for name, c in correct.items()}
    sizes = sorted({t.numel() for t in tensors.values()})
    if len(sizes) != 1:
        raise ValueError(f"the backbones were evaluated on different numbers of images: {sizes}")
    n = sizes[0]
    if n == 0:
        raise ValueError("no evaluation images to judge on")
    start = start if start in tensors else None
    random = random if random in tensors else None
    name_of = sentence_names(list(tensors), start, random, display)
    scores = {k: float(t.double().mean()) for k, t in tensors.items()}
    leader = pick_leader(scores, [start, random])
    reference = start if start is not None else random

    def cmp(backbone: str, ref: str) -> Comparison:
        return compare(tensors[ref], tensors[backbone], backbone, ref, evaluation, level, samples, seed)

    def acc(k: str) -> str:
        return f"{points(scores[k], False)}% top-1"

    def done(best: str, text: str, comparisons: Sequence[Comparison] = ()) -> Verdict:
        return Verdict(evaluation, n, best, leader, scores, text, list(comparisons))

    opening = f"On the evaluation data ({n} images, {EVALUATION_NAMES.get(evaluation, evaluation)})"
    if reference is None:  # neither the start nor random init evaluated: nothing to test against
        if len(tensors) == 1:
            return done(leader, f"{opening}, {name_of[leader]} is the only backbone evaluated: {acc(leader)}.")
        return done(
            leader,
            f"{opening}, {name_of[leader]} is best: {acc(leader)}; with neither the start nor random "
            f"initialization evaluated, whether that is beyond the evaluation's noise is unknown.",
        )

    ref_name = name_of[reference]
    keep = "keep the starting weights" if reference == start else "pretraining did not help on this data"
    # The reference against random init: quoted when the reference is what gets kept.
    ref_vs_random = cmp(reference, random) if random is not None and reference != random else None

    if leader == reference:
        rest = {k: s for k, s in scores.items() if k != reference}
        if not rest:
            return done(reference, f"{opening}, only {ref_name} was evaluated: {acc(reference)}; {keep}.")
        # The best of the rest, stages before random init at equal accuracy.
        runner = pick_leader(rest, [k for k in rest if k != random])
        c = cmp(runner, reference)
        text = (
            f"{opening}, {ref_name} is best ({acc(reference)}): no other backbone beats it "
            f"(best of the rest: {name_of[runner]}, {acc(runner)}, {brief(c)})"
        )
        if ref_vs_random is not None and random is not None and runner != random:
            text += f", and it is {versus(ref_vs_random, name_of[random])}"
            return done(reference, f"{text}; {keep}.", [c, ref_vs_random])
        return done(reference, f"{text}; {keep}.", [c])

    c_ref = cmp(leader, reference)
    if c_ref.better:
        text = f"{opening}, {name_of[leader]} is best: {acc(leader)}, {versus(c_ref, ref_name)}"
        if random is not None and leader != random and random != reference:
            c_random = cmp(leader, random)
            text += f" and {versus(c_random, name_of[random])}"
            return done(leader, f"{text}: export {name_of[leader]}.", [c_ref, c_random])
        if leader == random:
            text += "; the starting weights do not help on this data"
        return done(leader, f"{text}: export {name_of[leader]}.", [c_ref])

    what = "no pretraining stage beats" if leader != random else "random initialization does not beat"
    text = (
        f"{opening}, {what} {ref_name} beyond the evaluation's noise (best: {name_of[leader]}, {acc(leader)}, "
        f"{brief(c_ref)}): {keep} ({acc(reference)}"
    )
    if ref_vs_random is not None and random is not None and leader != random:
        text += f", {versus(ref_vs_random, name_of[random])}"
        return done(reference, f"{text}).", [c_ref, ref_vs_random])
    return done(reference, f"{text}).", [c_ref])


def rank_by_rankme(
    rankme: Mapping[str, float],
    start: str | None = "start",
    random: str | None = "random",
    display: Mapping[str, str] | None = None,
    tolerance: float = RANKME_TIE,
) -> Verdict:
    """Which backbone to export when there are no labels to evaluate on, by RankMe, the effective
    rank of the embeddings (Garrido et al. 2023, "RankMe: Assessing the downstream performance of
    pretrained self-supervised representations by their rank").

    RankMe is a label-free signal, weaker than labels: it tracks downstream accuracy across runs
    of one method (a collapsed embedding scores low) but is no accuracy, and comes with no
    interval. The highest wins, except that the start (or, without one, random init) is kept
    when the highest is within ``tolerance`` (relative, 1%) of it. Non-finite values never win.
    """
    scores = {k: float(v) for k, v in rankme.items()}
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        raise ValueError("no finite RankMe values to rank")
    start = start if start in finite else None
    random = random if random in finite else None
    name_of = sentence_names(list(scores), start, random, display)
    leader = pick_leader(finite, [start, random])
    reference = start if start is not None else random
    caveat = (
        "RankMe is a label-free signal, weaker than labels: it tracks downstream accuracy across runs of one "
        "method but is no accuracy and has no interval, so check the choice on labeled data when there is some."
    )
    opening = "Without labels, RankMe (the effective rank of the embeddings, Garrido et al. 2023)"
    keep = "keep the starting weights" if reference == start else "pretraining did not clearly help"

    def listing(*skip: str | None) -> str:
        return "".join(f", {name_of[k]} {v:.1f}" for k, v in scores.items() if k not in (leader, *skip))

    if reference is None:
        best = leader
        text = (
            f"{opening} ranks {name_of[leader]} highest ({finite[leader]:.1f}{listing()}): export {name_of[leader]}. "
        )
    elif leader == reference:
        best = reference
        text = f"{opening} ranks {name_of[leader]} highest ({finite[leader]:.1f}{listing()}): {keep}. "
    elif finite[leader] <= finite[reference] + tolerance * abs(finite[reference]):
        best = reference  # a near tie is no evidence of an improvement
        text = (
            f"{opening} ranks {name_of[leader]} highest ({finite[leader]:.1f}), within {100 * tolerance:g}% of "
            f"{name_of[reference]} ({finite[reference]:.1f}), too close to call: {keep}. "
        )
    else:
        best = leader
        gain = f", {100 * (finite[leader] / finite[reference] - 1):+.1f}%" if finite[reference] > 0 else ""
        text = (
            f"{opening} ranks {name_of[leader]} highest ({finite[leader]:.1f}{gain} over {name_of[reference]} at "
            f"{finite[reference]:.1f}{listing(reference)}): export {name_of[leader]}. "
        )
    return Verdict("rankme", 0, best, leader, scores, text + caveat, [], "rankme")
