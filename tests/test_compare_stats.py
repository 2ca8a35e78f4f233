"""Intervals and paired tests against hand-computed values; BLEU and macro-F1 per resample equal
the libraries' own figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftlab.compare.stats import (
    bootstrap_interval,
    compare_to_best,
    mcnemar_exact,
    paired_bootstrap,
    resample_indices,
)
from peftlab.data.metrics import bleu, bleu_from_statistics, bleu_statistics, macro_f1_indices


def test_mcnemar_exact_by_hand() -> None:
    # 8 pairs only a gets right, 2 only b: p = 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * 56 / 1024
    a = [True] * 8 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 8 + [True] * 2 + [True] * 5 + [False] * 3
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)
    assert mcnemar_exact(a, a) == 1.0  # no discordant pair
    assert mcnemar_exact([True] * 6, [False] * 6) == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar_exact([True], [True, False])


def test_bootstrap_interval_equals_the_percentiles_of_the_resampled_means() -> None:
    values = np.array([1.0] * 70 + [0.0] * 30)
    draws = resample_indices(100, resamples=200, seed=3)
    low, high = bootstrap_interval(lambda idx: float(values[idx].mean()), 100, indices=draws)
    means = np.sort(values[draws].mean(axis=1))
    assert low == pytest.approx(np.quantile(means, 0.025)) and high == pytest.approx(
        np.quantile(means, 0.975)
    )
    assert low < 0.7 < high
    # the normal approximation of a proportion's interval: about +-1.96 sqrt(p(1-p)/n)
    wide = bootstrap_interval(lambda idx: float(values[idx].mean()), 100)
    assert wide[1] - wide[0] == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 100), rel=0.2)


def test_resamples_are_the_same_every_time() -> None:
    assert np.array_equal(resample_indices(50), resample_indices(50))


def test_paired_bootstrap_by_construction() -> None:
    a = np.array([1.0] * 60 + [0.0] * 40)
    same = paired_bootstrap(lambda i: float(a[i].mean()), lambda i: float(a[i].mean()), 100)
    assert same == 1.0  # no difference at all
    b = a.copy()
    b[:40] = 0.0  # b is worse on 40 examples and never better
    p = paired_bootstrap(lambda i: float(a[i].mean()), lambda i: float(b[i].mean()), 100)
    # every resample favours a, so only the +1 correction is left: 2 / 1001
    assert p == pytest.approx(2 / 1001)


def test_compare_to_best_marks_ties() -> None:
    n = 200
    strong = np.array([1.0] * 160 + [0.0] * 40)  # 0.80
    close = strong.copy()
    close[:3] = 0.0  # 0.785: three examples apart
    weak = strong.copy()
    weak[:60] = 0.0  # 0.50
    scores = {name: (lambda arr: lambda i: float(arr[i].mean()))(v) for name, v in
              {"a": close, "b": strong, "c": weak}.items()}  # fmt: skip
    binary = {"a": list(close == 1), "b": list(strong == 1), "c": list(weak == 1)}
    best, comparisons = compare_to_best(scores, binary, n)
    assert best == "b"
    assert comparisons["b"].test == "best" and comparisons["b"].tied
    assert comparisons["a"].tied and comparisons["a"].test == "mcnemar"
    assert comparisons["a"].p_value == pytest.approx(2 / 8)  # 3 discordant pairs, all one way
    assert not comparisons["c"].tied and comparisons["c"].p_value < 1e-10
    _, boot = compare_to_best(scores, None, n)
    assert boot["a"].test == "paired bootstrap" and boot["a"].tied and not boot["c"].tied


def test_bleu_from_summed_statistics_is_sacrebleus_corpus_bleu() -> None:
    predictions = ["the cat sat on the mat", "a dog barks", "hello there world", "x y z"]
    references = ["the cat is on the mat", "a dog barks loudly", "hello world", "x y z w"]
    stats = bleu_statistics(predictions, references)
    assert bleu_from_statistics(stats) == pytest.approx(bleu(predictions, references))
    subset = [0, 0, 2, 3]
    assert bleu_from_statistics(stats[subset]) == pytest.approx(
        bleu([predictions[i] for i in subset], [references[i] for i in subset])
    )


def test_macro_f1_indices_equals_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        refs = rng.integers(0, 3, 30)
        preds = rng.integers(0, 4, 30)  # 3 is no class: always wrong
        ours = macro_f1_indices(preds, refs, 3)
        assert ours == pytest.approx(
            f1_score(refs, preds, labels=[0, 1, 2], average="macro", zero_division=0)
        )
