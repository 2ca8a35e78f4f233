"""How ``peftlab compare`` scores a test split: the metric that heads the report
(:func:`headline_metric`), which test rows are one item (:func:`group_items`), and the metric of
any resample of the items (:func:`metric_function`), which the bootstrap intervals and paired
tests of :mod:`peftlab.compare.stats` draw.

Free text is scored as the papers score it: E2E and WebNLG give several references per input
(every row sharing a meaning representation), and their tables report corpus BLEU with each
input one test item scored against all its references. So rows with the same prompt are one
item here: one prediction (the rows of an item share a prompt, hence a greedy prediction)
against every reference of its rows, and the bootstrap resamples items, not rows, since the
rows of an item are not independent draws.

A stored test output (:class:`~peftlab.compare.session.TestOutput` as a dict) holds
``predictions`` and ``references`` per row and, optionally, ``groups``: an item id per row
(:func:`group_items`). Without ``groups`` every row is its own item. Classification outputs are
never grouped (``groups`` is read for generation only).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftlab.data.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    chrf_from_statistics,
    chrf_statistics,
    example_scores,
    macro_f1_indices,
    reference_lists,
)

# a metric of a resample of the test items, given their indices
MetricFn = Callable[[np.ndarray], float]
# a task's own scorer over (predictions, references), for metrics without a per-item form
Scorer = Callable[[list[str], list[str]], dict[str, float]]

GENERATION_METRICS = ("bleu", "chrf", "rouge_l", "exact_match", "token_f1")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")

# BLEU is a geometric mean of 1- to 4-gram precisions: a reference of at most 3 words has no
# 4-gram to match, so when the typical reference is that short, corpus BLEU measures mostly the
# smoothing and the brevity penalty. Such completions (labels, codes, numbers, short answers)
# are judged whole.
SHORT_REFERENCE_WORDS = 3
# When at most half of the references are distinct, each value recurs twice or more on average:
# the completions are drawn from a closed set (labels, canned replies) and a prediction is right
# or wrong, not partly right. Free text is nearly all distinct (96% on a table-to-text set), so any
# share well under 1 separates the two; one half also leaves room for small test splits.
MAX_DISTINCT_SHARE = 0.5


def headline_metric(references: Sequence[str], labels: Sequence[str]) -> tuple[str, str]:
    """The metric that heads the report and, in words for it, the rule that chose it, judged
    from the test split's reference completions.

    In order: a classification task (``labels`` given) → ``accuracy``; structured values (every
    reference a JSON object or array), a closed set of values (distinct references at most
    :data:`MAX_DISTINCT_SHARE` of the rows) or short values (median reference at most
    :data:`SHORT_REFERENCE_WORDS` words) → ``exact_match``; else free text → ``bleu``.
    """
    if labels:
        return "accuracy", f"classification ({len(labels)} labels): accuracy"
    values = [r.strip() for r in references]
    if not values:
        raise ValueError("no references to choose a headline metric from")
    if all(_is_structured(v) for v in values):
        return "exact_match", "structured values (every reference is a JSON object or array): exact match"
    words = statistics.median(len(v.split()) for v in values)
    share = len(set(values)) / len(values)
    shape = f"median reference {words:g} word{'' if words == 1 else 's'}, {share:.0%} distinct"
    if share <= MAX_DISTINCT_SHARE:
        closed = f"{len(set(values))} distinct in {len(values)} rows, {shape}"
        return "exact_match", f"a closed set of values ({closed}): exact match"
    if words <= SHORT_REFERENCE_WORDS:
        return "exact_match", (
            f"short values ({shape}): exact match, since a reference of at most "
            f"{SHORT_REFERENCE_WORDS} words has no 4-gram for BLEU to match"
        )
    return "bleu", f"free text ({shape}): corpus BLEU over grouped references, as E2E and WebNLG are scored"


def _is_structured(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict | list)


def group_items(prompts: Sequence[str]) -> list[int]:
    """An item id per test row, numbered in order of first appearance: rows with exactly the
    same prompt text are one item (one input with several references, as in E2E and WebNLG)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(prompt, len(ids)) for prompt in prompts]


@dataclass(frozen=True)
class _Items:
    """A generation output as items: one prediction, its references and its rows each."""

    predictions: list[str]
    references: list[str] | list[list[str]]
    rows: list[list[int]]


def _items(output: dict[str, Any]) -> _Items:
    predictions, references = list(output["predictions"]), list(output["references"])
    groups = output.get("groups")
    if groups is None:  # every row its own item, with its one reference (exactly as ever)
        return _Items(predictions, references, [[i] for i in range(len(predictions))])
    if not len(groups) == len(predictions) == len(references):
        raise ValueError(
            f"{len(groups)} groups for {len(predictions)} predictions and {len(references)} references"
        )
    rows: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        rows.setdefault(group, []).append(row)
    members = list(rows.values())
    # greedy decoding of one prompt gives one prediction: the first row's stands for its item
    return _Items(
        [predictions[m[0]] for m in members], [[references[i] for i in m] for m in members], members
    )


def num_items(output: dict[str, Any], kind: str) -> int:
    """How many items the bootstrap resamples: the groups of a grouped generation output, else
    the rows."""
    if kind == "generation":
        return len(_items(output).rows)
    return len(output["predictions"])


def metric_function(
    output: dict[str, Any],
    metric: str,
    kind: str,
    num_labels: int,
    scorer: Scorer | None = None,
) -> MetricFn:
    """``metric`` of a resample of the test items (given their indices) of a stored test output:
    per-item arrays where the metric is a mean, summed statistics for BLEU and chrF, else the
    task's ``scorer`` rerun on the rows of the resampled items."""
    if kind != "generation":
        return _classification_function(output, metric, num_labels)
    items = _items(output)
    per_item = _per_item_function(items, metric)
    if per_item is not None:
        return per_item
    if scorer is None:
        raise ValueError(f"--metric {metric!r}: no per-example form and no task scorer to recompute it")
    return _rescored(output, items.rows, metric, scorer)


def score(
    output: dict[str, Any],
    metric: str,
    kind: str,
    num_labels: int,
    scorer: Scorer | None = None,
) -> float:
    """``metric`` over every test item of a stored test output."""
    everything = np.arange(num_items(output, kind))
    return metric_function(output, metric, kind, num_labels, scorer)(everything)


def _classification_function(output: dict[str, Any], metric: str, num_labels: int) -> MetricFn:
    predicted = np.asarray(output["predictions"])
    references = np.asarray(output["references"])
    if metric == "accuracy":
        correct = (predicted == references).astype(float)
        return lambda idx: float(correct[idx].mean())
    if metric == "macro_f1":
        return lambda idx: macro_f1_indices(predicted[idx], references[idx], num_labels)
    raise ValueError(f"--metric {metric!r}: classification runs measure accuracy and macro_f1")


def _per_item_function(items: _Items, metric: str) -> MetricFn | None:
    """The metric from per-item figures computed once (None if it has no per-item form)."""
    if metric == "bleu":
        bleu_stats = bleu_statistics(items.predictions, items.references)
        return lambda idx: bleu_from_statistics(bleu_stats[idx])
    if metric == "chrf":
        chrf_stats = chrf_statistics(items.predictions, items.references)
        return lambda idx: chrf_from_statistics(chrf_stats[idx])
    if metric in ("exact_match", "token_f1", "rouge_l"):
        values = example_scores(items.predictions, items.references)[metric]
        return lambda idx: float(values[idx].mean())
    return None


def _rescored(output: dict[str, Any], rows: list[list[int]], metric: str, scorer: Scorer) -> MetricFn:
    # the task's scorer takes one reference per row, so it sees the rows of the resampled items
    predictions, references = output["predictions"], output["references"]

    def metric_of(idx: np.ndarray) -> float:
        chosen = [row for i in idx for row in rows[i]]
        return float(scorer([predictions[r] for r in chosen], [references[r] for r in chosen])[metric])

    return metric_of


def binary_outcomes(output: dict[str, Any], metric: str, kind: str) -> list[bool] | None:
    """0/1 per test item where the metric is a mean of them (McNemar applies), else None: a
    classification row is right when it is its label; a generation item under exact match when
    its prediction equals any of its references, stripped."""
    if kind != "generation":
        if metric != "accuracy":
            return None
        return [p == r for p, r in zip(output["predictions"], output["references"], strict=True)]
    if metric != "exact_match":
        return None
    items = _items(output)
    return [
        any(prediction.strip() == r.strip() for r in refs)
        for prediction, refs in zip(items.predictions, reference_lists(items.references), strict=True)
    ]
