"""Quality metrics for held-out predictions: classification (accuracy, macro-F1) and generation
(exact match, SQuAD-style token F1, ROUGE-L), plus perplexity from a mean token loss.

Macro-F1 comes from scikit-learn and ROUGE-L from Google's ``rouge-score``, so the figures mean
what they mean elsewhere; token F1 follows the SQuAD v1.1 evaluation script's definition.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

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
    rouge_scorer = require("rouge_score.rouge_scorer", "ROUGE-L")

    n = _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return (
        sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)) / n
    )


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {
        "exact_match": exact_match(predictions, references),
        "token_f1": mean_token_f1(predictions, references),
        "rouge_l": rouge_l(predictions, references),
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
