"""How compare scores a test split: the headline metric and its rule, rows grouped into items by
prompt, and the metric of a resample of items (grouped outputs scored against every reference of
an item; ungrouped outputs exactly as ``compare.results`` scored them)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sacrebleu

from peftlab.compare.scoring import (
    MAX_DISTINCT_SHARE,
    SHORT_REFERENCE_WORDS,
    binary_outcomes,
    group_items,
    headline_metric,
    metric_function,
    num_items,
    score,
)
from peftlab.compare.stats import resample_indices
from peftlab.data.metrics import (
    bleu,
    bleu_from_statistics,
    bleu_statistics,
    chrf,
    example_scores,
    label_scorer,
    macro_f1_indices,
    token_f1,
)

FREE_TEXT = [
    "The Eagle is a low-priced coffee shop near Burger King in the riverside area.",
    "Alimentum is a Chinese restaurant in the city centre with high prices.",
    "Blue Spice is a pub by the riverside that welcomes families and children.",
    "By the river is Blue Spice, a family friendly pub serving English food.",
]


def test_headline_classification_is_accuracy() -> None:
    metric, rule = headline_metric(["positive"], ["negative", "positive"])
    assert metric == "accuracy" and rule == "classification (2 labels): accuracy"


def test_headline_label_like_values_are_a_closed_set() -> None:
    references = ["very positive", "negative", "neutral", "negative"] * 10
    metric, rule = headline_metric(references, [])
    assert metric == "exact_match"
    shape = "3 distinct in 40 rows, median reference 1 word, 8% distinct"
    assert rule == f"a closed set of values ({shape}): exact match"


def test_headline_json_is_structured() -> None:
    references = [json.dumps({"name": f"person {i}", "age": i}) for i in range(30)]
    references.append('  [1, 2, {"a": "b"}]  ')
    metric, rule = headline_metric(references, [])
    assert metric == "exact_match" and "every reference is a JSON object or array" in rule
    # one reference that is not JSON (a bare number is JSON, but no structure) and it is text
    assert headline_metric([*references, "42"], [])[0] == "bleu"


def test_headline_short_codes_are_exact_match() -> None:
    codes = [f"SKU-{i:04d}" for i in range(50)] + ["2024-01-05 UTC"]  # all distinct, 1-2 words
    metric, rule = headline_metric(codes, [])
    assert metric == "exact_match"
    assert rule.startswith("short values (median reference 1 word, 100% distinct)")
    assert "no 4-gram for BLEU" in rule


def test_headline_free_sentences_are_bleu() -> None:
    metric, rule = headline_metric(FREE_TEXT * 2 + ["A pub."], [])
    assert metric == "bleu"
    assert rule == (
        "free text (median reference 13 words, 56% distinct): corpus BLEU over grouped references, "
        "as E2E and WebNLG are scored"
    )


def test_headline_thresholds() -> None:
    def distinct(words: int) -> list[str]:
        return [" ".join([f"w{i}"] * words) for i in range(20)]

    assert headline_metric(distinct(SHORT_REFERENCE_WORDS), [])[0] == "exact_match"
    assert headline_metric(distinct(SHORT_REFERENCE_WORDS + 1), [])[0] == "bleu"
    long = distinct(10)
    half = int(len(long) * MAX_DISTINCT_SHARE)
    assert headline_metric(long[:half] * 2, [])[0] == "exact_match"  # exactly half distinct
    assert headline_metric(long[: half + 1] + long[: half - 1], [])[0] == "bleu"
    with pytest.raises(ValueError, match="no references"):
        headline_metric([], [])


def test_group_items_by_exact_prompt() -> None:
    prompts = ["name[Eagle]", "name[Mill]", "name[Eagle]", "name[Eagle] ", "name[Mill]"]
    assert group_items(prompts) == [0, 1, 0, 2, 1]  # a trailing space is another prompt
    assert group_items([]) == []


# ---- ungrouped outputs: exactly as compare.results scored them ------------------------------

# compare/results.py's metric_function and binary_outcomes as they stood (commit b11fa5f) before
# they moved to compare/scoring.py: the oracle that ungrouped outputs score exactly as they did.
# (Verified against the live results.py functions too while they were still there.)


def _legacy_metric_function(
    output: dict[str, Any],
    metric: str,
    kind: str,
    num_labels: int,
    scorer: Callable[[list[str], list[str]], dict[str, float]] | None = None,
) -> Callable[[np.ndarray], float]:
    """``metric`` of a resample of the test examples (given their indices) of a stored
    :class:`~peftlab.compare.inputs.TestOutput`: per-example arrays where the metric is a mean
    (or BLEU's summed statistics); else the task's ``scorer`` rerun on the resample."""
    if kind != "generation":
        predicted = np.asarray(output["predictions"])
        references = np.asarray(output["references"])
        if metric == "accuracy":
            correct = (predicted == references).astype(float)
            return lambda idx: float(correct[idx].mean())
        if metric == "macro_f1":
            return lambda idx: macro_f1_indices(predicted[idx], references[idx], num_labels)
        raise ValueError(f"--metric {metric!r}: classification runs measure accuracy and macro_f1")
    predictions, refs = output["predictions"], output["references"]
    if metric == "bleu":
        stats = bleu_statistics(predictions, refs)
        return lambda idx: bleu_from_statistics(stats[idx])
    scores = example_scores(predictions, refs)
    if metric in scores:
        values = scores[metric]
        return lambda idx: float(values[idx].mean())
    if scorer is None:
        raise ValueError(f"--metric {metric!r}: no per-example form and no task scorer to recompute it")
    task_scorer = scorer
    return lambda idx: float(task_scorer([predictions[i] for i in idx], [refs[i] for i in idx])[metric])


def _legacy_binary_outcomes(output: dict[str, Any], metric: str, kind: str) -> list[bool] | None:
    """0/1 per test example where the metric is a mean of them (McNemar applies), else None."""
    if kind != "generation" and metric == "accuracy":
        return [p == r for p, r in zip(output["predictions"], output["references"], strict=True)]
    if kind == "generation" and metric == "exact_match":
        return [
            p.strip() == r.strip() for p, r in zip(output["predictions"], output["references"], strict=True)
        ]
    return None


def _generation_output(seed: int, rows: int) -> dict[str, Any]:
    rng = random.Random(seed)
    vocab = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "mat", "park", "near", ",", ".", "42"]

    def text() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))

    references = [text() for _ in range(rows)]
    # some predictions right (give exact match and McNemar something to count), some spaced
    predictions = [f" {r} " if rng.random() < 0.3 else text() for r in references]
    return {"predictions": predictions, "references": references}


@pytest.mark.parametrize("metric", ["bleu", "exact_match", "token_f1", "rouge_l", "valid_label"])
def test_ungrouped_generation_scores_as_compare_results_did(metric: str) -> None:
    output = _generation_output(0, 60)
    scorer = label_scorer(["the", "a"])
    ours = metric_function(output, metric, "generation", 0, scorer)
    theirs = _legacy_metric_function(output, metric, "generation", 0, scorer)
    for idx in [np.arange(60), *resample_indices(60, resamples=5, seed=1)]:
        assert ours(idx) == theirs(idx)
    assert num_items(output, "generation") == 60
    assert score(output, metric, "generation", 0, scorer) == theirs(np.arange(60))
    assert binary_outcomes(output, metric, "generation") == _legacy_binary_outcomes(
        output, metric, "generation"
    )


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_classification_scores_as_compare_results_did(metric: str) -> None:
    rng = np.random.default_rng(0)
    output = {"predictions": list(rng.integers(0, 3, 50)), "references": list(rng.integers(0, 3, 50))}
    ours = metric_function(output, metric, "causal-classification", 3)
    theirs = _legacy_metric_function(output, metric, "causal-classification", 3)
    for idx in [np.arange(50), *resample_indices(50, resamples=5, seed=2)]:
        assert ours(idx) == theirs(idx)
    assert num_items(output, "encoder-classification") == 50
    expected = _legacy_binary_outcomes(output, metric, "encoder-classification")
    assert binary_outcomes(output, metric, "encoder-classification") == expected
    with pytest.raises(ValueError, match="classification runs measure accuracy and macro_f1"):
        metric_function(output, "bleu", "encoder-classification", 3)


def test_ungrouped_chrf_is_sacrebleus() -> None:
    output = _generation_output(3, 40)
    f = metric_function(output, "chrf", "generation", 0)
    assert f(np.arange(40)) == chrf(output["predictions"], output["references"])
    idx = resample_indices(40, resamples=1, seed=4)[0]
    resampled = [output["predictions"][i] for i in idx], [output["references"][i] for i in idx]
    assert f(idx) == sacrebleu.corpus_chrf(resampled[0], [resampled[1]]).score


# ---- grouped outputs: one item per prompt, scored against all its references ----------------

# rows 0, 2, 3 are one input (three references), row 1 another, rows 4-5 a third; the rows of an
# item carry the same greedy prediction
GROUPED: dict[str, Any] = {
    "predictions": ["the cat sat", "a dog", "the cat sat", "the cat sat", " pub ", " pub "],
    "references": ["a cat sat", "the dog", "the cat sat", "cat on mat", "the pub", "pub"],
    "groups": [5, 1, 5, 5, 0, 0],
}
ITEM_PREDICTIONS = ["the cat sat", "a dog", " pub "]  # items in order of first appearance
ITEM_REFERENCES = [["a cat sat", "the cat sat", "cat on mat"], ["the dog"], ["the pub", "pub"]]


def test_grouped_items_and_exact_match_by_hand() -> None:
    assert num_items(GROUPED, "generation") == 3
    # item 0 matches its second reference; "a dog" is not "the dog"; " pub " is "pub" stripped
    assert binary_outcomes(GROUPED, "exact_match", "generation") == [True, False, True]
    f = metric_function(GROUPED, "exact_match", "generation", 0)
    assert f(np.arange(3)) == pytest.approx(2 / 3) == score(GROUPED, "exact_match", "generation", 0)
    assert f(np.array([1, 1, 0])) == pytest.approx(1 / 3)
    assert binary_outcomes(GROUPED, "bleu", "generation") is None


def test_grouped_token_f1_and_rouge_l_take_the_best_reference() -> None:
    # token F1: item 0 exact (1.0); "a dog" vs "the dog" normalise to "dog" and "dog" (1.0);
    # "pub" vs "pub" (1.0). ROUGE-L: 1.0, "a dog" vs "the dog" LCS 1 of 2 each (0.5), 1.0
    assert score(GROUPED, "token_f1", "generation", 0) == pytest.approx(1.0)
    assert token_f1("a dog", "the dog") == 1.0
    assert score(GROUPED, "rouge_l", "generation", 0) == pytest.approx((1 + 0.5 + 1) / 3)


@pytest.mark.parametrize(
    "metric, sacrebleu_corpus", [("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)]
)
def test_grouped_bleu_and_chrf_are_sacrebleus_on_items(metric: str, sacrebleu_corpus: Any) -> None:
    f = metric_function(GROUPED, metric, "generation", 0)
    for idx in [[0, 1, 2], [2, 2, 0], [1, 0, 0], [2]]:
        references = [ITEM_REFERENCES[i] for i in idx]
        width = max(len(refs) for refs in references)
        streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
        expected = sacrebleu_corpus([ITEM_PREDICTIONS[i] for i in idx], streams).score
        assert f(np.array(idx)) == expected, idx
    assert score(GROUPED, "bleu", "generation", 0) == bleu(ITEM_PREDICTIONS, ITEM_REFERENCES)


def test_grouped_task_scorer_sees_the_rows_of_the_resampled_items() -> None:
    seen: list[list[str]] = []

    def scorer(predictions: list[str], references: list[str]) -> dict[str, float]:
        seen.append(references)
        return {"rows": float(len(references))}

    f = metric_function(GROUPED, "rows", "generation", 0, scorer)
    assert f(np.array([2, 1, 2])) == 5.0
    assert seen == [["the pub", "pub", "the dog", "the pub", "pub"]]
    with pytest.raises(ValueError, match="no per-example form"):
        metric_function(GROUPED, "rows", "generation", 0)


def test_groups_must_cover_every_row() -> None:
    with pytest.raises(ValueError, match="5 groups for 6 predictions"):
        num_items({**GROUPED, "groups": GROUPED["groups"][:5]}, "generation")


def test_compare_headlines_free_text_by_grouped_bleu(tiny_llama: Path, tmp_path: Path) -> None:
    """Free-sentence completions, and test rows sharing a prompt (as E2E and WebNLG have them):
    the headline is corpus BLEU over items, each prediction against all its rows' references."""
    from conftest import WORDS
    from peftlab.cli import main

    def sentence(i: int) -> str:
        return " " + " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 7))

    train = [{"prompt": f"q {WORDS[i % 9]} {i} :", "completion": sentence(i)} for i in range(60)]
    held = [{"prompt": f"q {WORDS[i % 4]} :", "completion": sentence(100 + i)} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(r) for r in held) + "\n")
    out = tmp_path / "out"
    args = ["compare", "--quick", "--model", str(tiny_llama), "--data", str(tmp_path / "train.jsonl"),
            "--eval-data", str(tmp_path / "held.jsonl"), "--methods", "lora", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["metric"] == "bleu" and results["task"]["metric_rule"].startswith("free text")
    test = results["methods"][0]["runs"][0]["test"]
    assert len(set(test["groups"])) == 4  # 12 rows, 4 distinct prompts
    items: dict[int, list[int]] = {}
    for row, group in enumerate(test["groups"]):
        items.setdefault(group, []).append(row)
    hypotheses = [test["predictions"][rows[0]] for rows in items.values()]
    streams = [[test["references"][rows[k]] for rows in items.values()] for k in range(3)]
    expected = sacrebleu.corpus_bleu(hypotheses, streams).score
    assert results["methods"][0]["quality"]["mean"] == pytest.approx(expected, abs=1e-9)
