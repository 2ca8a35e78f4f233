"""Quality metrics for held-out predictions: classification (accuracy, macro-F1) and generation
(exact match, SQuAD-style token F1, ROUGE-L, BLEU), plus perplexity from a mean token loss.

Macro-F1 comes from scikit-learn, ROUGE-L from Google's ``rouge-score`` and BLEU from
``sacrebleu`` (corpus BLEU, 0-100, its default 13a tokenisation: the figure the E2E / WebNLG
tables of the prefix-tuning and LoRA papers report), so the figures mean what they mean
elsewhere; token F1 follows the SQuAD v1.1 evaluation script's definition. The per-example
forms (:func:`example_scores`, :func:`bleu_statistics`) let a bootstrap recompute every metric on
a resample of the examples without re-running the scorers.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from peftlab.extras import require

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _check_lengths(predictions: Sequence[object], references: Sequence[object]) -> int:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("nothing to score (no references)")
    return len(references)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after :func:`normalize_answer`.

    Tokens are counted as a multiset; two empty answers agree (1.0), one empty answer scores 0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after stripping surrounding whitespace."""
    n = _check_lengths(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n


def mean_token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    n = _check_lengths(predictions, references)
    return sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / n


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of tokens), ``rouge-score``'s default
    tokenizer (lower case, runs of ASCII letters and digits) without stemming."""
    n = _check_lengths(predictions, references)
    return sum(_rouge_scores(predictions, references)) / n


def _rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    rouge_scorer = require("rouge_score.rouge_scorer", "ROUGE-L")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with one reference per prediction, as ``sacrebleu`` computes it."""
    sacrebleu = require("sacrebleu", "BLEU")
    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per example, BLEU's sufficient statistics ``[matches_1..4, totals_1..4, sys_len, ref_len]``:
    summed over any subset of the examples, :func:`bleu_from_statistics` gives that subset's
    corpus BLEU."""
    sacrebleu = require("sacrebleu", "BLEU")
    metric = sacrebleu.BLEU(effective_order=True)  # the counts are the same; no sentence-BLEU warning
    rows = []
    for p, r in zip(predictions, references, strict=True):
        score = metric.sentence_score(p, [r])
        rows.append([*score.counts, *score.totals, score.sys_len, score.ref_len])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 10)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed :func:`bleu_statistics` rows."""
    sacrebleu = require("sacrebleu", "BLEU")
    total = stats.sum(axis=0)
    return float(
        sacrebleu.BLEU.compute_bleu(
            [int(x) for x in total[:4]],
            [int(x) for x in total[4:8]],
            int(total[8]),
            int(total[9]),
            smooth_method="exp",  # corpus_bleu's default
        ).score
    )


def example_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example exact match, token F1 and ROUGE-L: their means are :func:`generation_metrics`'."""
    _check_lengths(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    return {
        "exact_match": np.array([float(p.strip() == r.strip()) for p, r in pairs]),
        "token_f1": np.array([token_f1(p, r) for p, r in pairs]),
        "rouge_l": np.array(_rouge_scores(predictions, references)),
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {
        "exact_match": exact_match(predictions, references),
        "token_f1": mean_token_f1(predictions, references),
        "rouge_l": rouge_l(predictions, references),
        "bleu": bleu(predictions, references),
    }


def classification_metrics(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (unweighted mean of per-class F1 over ``labels``, default the
    classes in ``references``). A prediction outside ``labels`` is simply wrong: it lowers the
    recall of its true class and adds to no class's precision."""
    f1_score = require("sklearn.metrics", "macro-F1").f1_score

    n = _check_lengths(predictions, references)
    classes = sorted(set(references)) if labels is None else list(labels)
    accuracy = sum(p == r for p, r in zip(predictions, references, strict=True)) / n
    macro = f1_score(list(references), list(predictions), labels=classes, average="macro", zero_division=0)
    return {"accuracy": accuracy, "macro_f1": float(macro)}


def macro_f1_indices(predicted: np.ndarray, references: np.ndarray, num_classes: int) -> float:
    """Macro-F1 of class indices (a prediction outside ``range(num_classes)`` is simply wrong),
    equal to scikit-learn's ``f1_score(average="macro", zero_division=0)``; vectorised, for
    bootstrap resamples."""
    classes = np.arange(num_classes)[:, None]
    pred_is = predicted[None, :] == classes
    ref_is = references[None, :] == classes
    tp = (pred_is & ref_is).sum(1)
    denominator = pred_is.sum(1) + ref_is.sum(1)
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return float(f1.mean())


def perplexity(mean_token_loss: float) -> float:
    """exp(mean next-token cross-entropy in nats); inf when the loss overflows."""
    try:
        return math.exp(mean_token_loss)
    except OverflowError:
        return math.inf


def parse_json_object(text: str) -> dict[str, object] | None:
    """The first JSON object in ``text`` (models often keep talking after it), or None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
