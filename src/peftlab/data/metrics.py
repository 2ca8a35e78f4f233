"""Quality metrics for held-out predictions: classification (accuracy, macro-F1) and generation
(exact match, SQuAD-style token F1, ROUGE-L, BLEU, chrF), plus perplexity from a mean token loss.

The figures mean what they mean elsewhere: BLEU is ``sacrebleu``'s (corpus BLEU, 0-100, its
default 13a tokenisation: the figure the E2E / WebNLG tables of the prefix-tuning and LoRA
papers report), and so is chrF (``sacrebleu.CHRF``'s defaults: chrF2); macro-F1 equals
scikit-learn's ``f1_score(average="macro", zero_division=0)`` and ROUGE-L equals Google's
``rouge-score`` (``RougeScorer(["rougeL"])``), both computed here, since each is a few lines of
counting, so that ``peftlab train`` needs neither package (the tests check both against the
packages, figure for figure); token F1 follows the SQuAD v1.1 evaluation script's definition.

The per-example forms (:func:`example_scores`, :func:`bleu_statistics`, :func:`chrf_statistics`)
let a bootstrap recompute every metric on a resample of the examples without re-running the
scorers.

A generation metric takes, per prediction, one reference or several (:data:`Reference`: E2E and
WebNLG give several per input). With several, each metric takes them as its reference scorer
does: corpus BLEU and chrF as ``sacrebleu`` does given several reference streams (BLEU clips
each n-gram's count by its highest count in any reference and takes the closest reference
length; chrF takes the best-scoring reference), ROUGE-L as ``rouge-score``'s ``score_multi`` (the best
F-measure), token F1 as the SQuAD script (the best) and exact match if any reference matches.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np

from peftlab.extras import require

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
# rouge-score's tokenizer: lower case, [^a-z0-9]+ becomes a space, split, keep ^[a-z0-9]+$ tokens
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")

# one prediction's reference, or all of its references (a lone string is one reference)
Reference: TypeAlias = str | Sequence[str]


def _check_lengths(predictions: Sequence[object], references: Sequence[object]) -> int:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("nothing to score (no references)")
    return len(references)


def reference_lists(references: Sequence[Reference]) -> list[list[str]]:
    """Each prediction's references as a list; a prediction with none is an error, since no
    metric can score it (sacrebleu would fail deep inside, or silently drop the item)."""
    lists = [[r] if isinstance(r, str) else list(r) for r in references]
    empty = [i for i, refs in enumerate(lists) if not refs]
    if empty:
        raise ValueError(f"{len(empty)} predictions have no reference (the first is #{empty[0]})")
    return lists


def reference_streams(references: Sequence[Reference]) -> list[list[str | None]]:
    """``sacrebleu``'s layout of several references per prediction: stream ``k`` holds every
    prediction's ``k``-th reference, and a prediction with fewer references has ``None`` there.

    ``None`` is the one padding sacrebleu drops (``Metric._cache_references``); an empty string
    is kept as a real, empty reference (it shortens BLEU's closest reference length), and a
    shorter stream silently truncates the whole corpus, since the streams are zipped."""
    lists = reference_lists(references)
    if not lists:
        raise ValueError("nothing to score (no references)")
    width = max(len(refs) for refs in lists)
    padded: list[list[str | None]] = [[*refs, *[None] * (width - len(refs))] for refs in lists]
    return [list(stream) for stream in zip(*padded, strict=True)]


def _best(
    score: Callable[[str, str], float], predictions: Sequence[str], references: Sequence[Reference]
) -> list[float]:
    """Per prediction, the best ``score(prediction, reference)`` over its references."""
    _check_lengths(predictions, references)
    lists = reference_lists(references)
    return [max(score(p, r) for r in refs) for p, refs in zip(predictions, lists, strict=True)]


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


def _exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Share of predictions equal to a reference of theirs after stripping surrounding whitespace."""
    scores = _best(_exact, predictions, references)
    return sum(scores) / len(scores)


def mean_token_f1(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean over predictions of the best :func:`token_f1` over their references."""
    scores = _best(token_f1, predictions, references)
    return sum(scores) / len(scores)


def rouge_tokens(text: str) -> list[str]:
    """``rouge-score``'s default tokens without stemming: after lower-casing, the runs of ASCII
    letters and digits (anything else separates tokens and is dropped)."""
    return _ROUGE_TOKEN.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_score(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction: with L the longest common subsequence of the
    :func:`rouge_tokens`, P = L / len(prediction), R = L / len(reference), F = 2PR / (P + R);
    0 when either side has no token. The same arithmetic as ``rouge-score``'s ``_score_lcs``."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean ROUGE-L F-measure (:func:`rouge_l_score`, the best over each prediction's
    references), as ``rouge-score``'s ``score`` (one reference) and ``score_multi`` compute it."""
    scores = _rouge_scores(predictions, references)
    return sum(scores) / len(scores)


def _rouge_scores(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    return _best(rouge_l_score, predictions, references)


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus BLEU (0-100), as ``sacrebleu.corpus_bleu`` computes it on the
    :func:`reference_streams` of one or several references per prediction."""
    sacrebleu = require("sacrebleu", "BLEU")
    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), reference_streams(references)).score)


def bleu_statistics(predictions: Sequence[str], references: Sequence[Reference]) -> np.ndarray:
    """Per example, BLEU's sufficient statistics ``[matches_1..4, totals_1..4, sys_len, ref_len]``
    against all its references (``ref_len`` the closest one's length): summed over any subset of
    the examples, :func:`bleu_from_statistics` gives that subset's corpus BLEU."""
    sacrebleu = require("sacrebleu", "BLEU")
    _check_lengths(predictions, references)
    metric = sacrebleu.BLEU(effective_order=True)  # the counts are the same; no sentence-BLEU warning
    rows = []
    for p, refs in zip(predictions, reference_lists(references), strict=True):
        score = metric.sentence_score(p, refs)
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


def _chrf_metric() -> Any:
    # sacrebleu.CHRF's defaults are corpus_chrf's: chrF2, character 6-grams, no word n-grams
    return require("sacrebleu", "chrF").CHRF()


def chrf(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus chrF (0-100), as ``sacrebleu.corpus_chrf`` computes it on the
    :func:`reference_streams` of one or several references per prediction."""
    _check_lengths(predictions, references)
    return float(_chrf_metric().corpus_score(list(predictions), reference_streams(references)).score)


def chrf_statistics(predictions: Sequence[str], references: Sequence[Reference]) -> np.ndarray:
    """Per example, chrF's sufficient statistics (``[hyp, ref, match]`` counts per n-gram order,
    against its best-scoring reference): summed over any subset of the examples,
    :func:`chrf_from_statistics` gives that subset's corpus chrF.

    sacrebleu offers them through the methods its own paired bootstrap and approximate
    randomisation use (``_extract_corpus_statistics``, ``_compute_score_from_stats``); no public
    call returns them, and the tests hold these figures equal to ``corpus_chrf``'s."""
    _check_lengths(predictions, references)
    metric = _chrf_metric()
    stats = metric._extract_corpus_statistics(list(predictions), reference_streams(references))
    return np.asarray(stats, dtype=np.int64).reshape(len(predictions), 3 * metric.order)


def chrf_from_statistics(stats: np.ndarray) -> float:
    """Corpus chrF (0-100) from summed :func:`chrf_statistics` rows."""
    total = [int(x) for x in stats.sum(axis=0)]
    return float(_chrf_metric()._compute_score_from_stats(total).score)


def example_scores(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, np.ndarray]:
    """Per-example exact match, token F1 and ROUGE-L (each the best over the example's
    references): their means are :func:`generation_metrics`'."""
    return {
        "exact_match": np.array(_best(_exact, predictions, references)),
        "token_f1": np.array(_best(token_f1, predictions, references)),
        "rouge_l": np.array(_rouge_scores(predictions, references)),
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
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
    n = _check_lengths(predictions, references)
    classes = sorted(set(references)) if labels is None else list(labels)
    accuracy = sum(p == r for p, r in zip(predictions, references, strict=True)) / n
    index = {label: i for i, label in enumerate(classes)}
    predicted = np.array([index.get(p, -1) for p in predictions], dtype=np.int64)
    true = np.array([index.get(r, -1) for r in references], dtype=np.int64)
    return {"accuracy": accuracy, "macro_f1": macro_f1_indices(predicted, true, len(classes))}


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


# ---- scoring completions against labels and structured references ---------------------------


def score_generation(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """:func:`generation_metrics`, and ``valid_json`` (the share of predictions that parse as a
    JSON object) where every reference is one."""
    out = generation_metrics(predictions, references)
    if all(parse_json_object(r) is not None for r in references):
        parsed = sum(parse_json_object(p) is not None for p in predictions)
        out["valid_json"] = parsed / len(references)
    return out


def match_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a generated completion names: the longest label that the text (lower-cased,
    stripped) equals or starts with, followed by a non-word character; else None."""
    said = text.strip().lower()
    best = None
    for label in labels:
        low = label.lower()
        if said == low or (said.startswith(low) and not said[len(low)].isalnum()):
            best = label if best is None or len(label) > len(best) else best
    return best


def label_scorer(labels: Sequence[str]) -> Callable[[Sequence[str], Sequence[str]], dict[str, float]]:
    """A scorer over completions (generated or chosen by label scoring): accuracy, macro-F1 and
    ``valid_label`` (the completion names some label)."""
    names = tuple(labels)

    def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        refs = [match_label(r, names) or r.strip() for r in references]
        matched = [match_label(p, names) for p in predictions]
        out = classification_metrics([m or "" for m in matched], refs, names)
        out["valid_label"] = sum(m is not None for m in matched) / len(refs)
        return out

    return score
