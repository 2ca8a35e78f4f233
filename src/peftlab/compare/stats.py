"""Uncertainty and significance for ``peftlab compare``, over the held-out test examples.

- A 95% percentile-bootstrap interval for every quality figure: the test examples are resampled
  with replacement (:data:`RESAMPLES` times, from a fixed seed, so the figures repeat) and the
  metric recomputed on each resample, which covers corpus-level metrics (macro-F1, BLEU) as well
  as per-example ones.
- A paired test of each method against the best one on the same test examples: the exact
  McNemar test for a 0/1 score per example (accuracy, exact match) with one seed, else a paired
  bootstrap of the difference. A method whose difference from the best is not significant at
  :data:`ALPHA` is *tied* with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
ALPHA = 0.05
SEED = 20260101

# a metric of a subset of the test examples, given their indices
MetricFn = Callable[[np.ndarray], float]


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) indices drawn with replacement; the same for every method of a run, so
    paired comparisons resample the same examples."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(
    metric: MetricFn, n: int, *, level: float = 0.95, indices: np.ndarray | None = None
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``metric`` over ``n`` test examples."""
    draws = resample_indices(n) if indices is None else indices
    values = np.array([metric(row) for row in draws])
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes: a binomial test of the
    discordant pairs (``a`` right and ``b`` wrong vs the reverse) against 1/2."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths: {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(
    metric_a: MetricFn, metric_b: MetricFn, n: int, indices: np.ndarray | None = None
) -> float:
    """Two-sided paired-bootstrap p-value of ``metric_a - metric_b`` on the same resamples: twice
    the share of resamples on the far side of zero (with a +1 correction, so never exactly 0)."""
    draws = resample_indices(n) if indices is None else indices
    diffs = np.array([metric_a(row) - metric_b(row) for row in draws])
    observed = metric_a(np.arange(n)) - metric_b(np.arange(n))
    if observed == 0:
        return 1.0
    far = int(np.sum(diffs <= 0)) if observed > 0 else int(np.sum(diffs >= 0))
    return min(1.0, 2 * (far + 1) / (len(diffs) + 1))


@dataclass(frozen=True)
class Comparison:
    """One method against the best: the test used, its p-value and whether they are tied."""

    test: str  # "mcnemar" / "paired bootstrap" / "best"
    p_value: float
    tied: bool

    def to_dict(self) -> dict[str, object]:
        return {"test": self.test, "p_value": self.p_value, "tied_with_best": self.tied}


def compare_to_best(
    scores: dict[str, MetricFn],
    binary: dict[str, Sequence[bool]] | None,
    n: int,
    *,
    alpha: float = ALPHA,
) -> tuple[str, dict[str, Comparison]]:
    """The best method (highest full-sample metric; ties broken by order) and each method's
    comparison with it. ``binary`` gives 0/1 per-example outcomes when McNemar applies."""
    if not scores:
        raise ValueError("no methods to compare")
    everything = np.arange(n)
    best = max(scores, key=lambda name: scores[name](everything))
    draws = resample_indices(n)
    out: dict[str, Comparison] = {}
    for name, metric in scores.items():
        if name == best:
            out[name] = Comparison("best", 1.0, True)
            continue
        if binary is not None:
            p = mcnemar_exact(binary[best], binary[name])
            test = "mcnemar"
        else:
            p = paired_bootstrap(scores[best], metric, n, draws)
            test = "paired bootstrap"
        out[name] = Comparison(test, p, p >= alpha)
    return best, out


def compare_pair(
    metric_a: MetricFn,
    metric_b: MetricFn,
    n: int,
    binary: tuple[Sequence[bool], Sequence[bool]] | None = None,
    *,
    alpha: float = ALPHA,
) -> tuple[str, float]:
    """Which of two methods is ahead on the same test examples: ("a", p), ("b", p) or ("tied",
    p), by the test :func:`compare_to_best` uses (McNemar with 0/1 outcomes, else a paired
    bootstrap)."""
    p = mcnemar_exact(*binary) if binary is not None else paired_bootstrap(metric_a, metric_b, n)
    if p >= alpha:
        return "tied", p
    everything = np.arange(n)
    return ("a" if metric_a(everything) > metric_b(everything) else "b"), p


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap ``values`` (NaNs, from a resample where the quantity
    is undefined, left out)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))
