"""Several references per prediction (E2E, WebNLG): corpus BLEU and chrF equal sacrebleu's on
the same reference streams, their per-item statistics give sacrebleu's figure on any resample
of the items, ROUGE-L equals rouge-score's ``score_multi``, and one reference per prediction
gives the figures it always did."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from peftlab.data.metrics import (
    bleu,
    bleu_from_statistics,
    bleu_statistics,
    chrf,
    chrf_from_statistics,
    chrf_statistics,
    exact_match,
    example_scores,
    generation_metrics,
    mean_token_f1,
    reference_lists,
    reference_streams,
    rouge_l,
    rouge_l_score,
    token_f1,
)

# E2E-like items with 1, 3, 2 and 3 references: every stream after the first is padded somewhere
PREDICTIONS = [
    "The Eagle is a cheap coffee shop near Burger King.",
    "Alimentum serves Chinese food in the city centre.",
    "Blue Spice is a family friendly pub by the river.",
    "The Mill is a pub.",
]
REFERENCES = [
    ["The Eagle is a low-priced coffee shop near Burger King in the riverside area."],
    [
        "Alimentum is a Chinese restaurant in the city centre.",
        "In the city centre, Alimentum serves Chinese food at high prices.",
        "Alimentum offers Chinese food in the centre of the city.",
    ],
    ["Blue Spice is a pub by the riverside that welcomes families.", "By the river is Blue Spice, a pub."],
    ["The Mill is a pub near the river.", "The Mill pub is by the riverside.", "A pub: The Mill."],
]


def _streams_by_hand(references: Sequence[Sequence[str]]) -> Any:
    # the layout sacrebleu documents: stream k = every item's k-th reference, None where missing
    # (typed Any: sacrebleu's annotations say str, though its docstrings and code take None)
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def _random_corpus(seed: int, items: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    vocab = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "mat", "park", "pub", "food", ",", "."]

    def sentence() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))

    predictions = [sentence() for _ in range(items)]
    references = [[sentence() for _ in range(rng.randint(1, 4))] for _ in range(items)]
    return predictions, references


def test_reference_streams_pad_missing_references_with_none() -> None:
    assert reference_streams(["a", ["b", "c"], ["d", "e", "f"]]) == [
        ["a", "b", "d"],
        [None, "c", "e"],
        [None, None, "f"],
    ]
    assert reference_streams(["x", "y"]) == [["x", "y"]]  # one reference each: one stream
    assert reference_lists(["x", ("y", "z")]) == [["x"], ["y", "z"]]
    with pytest.raises(ValueError, match="1 predictions have no reference"):
        reference_lists(["x", []])


def test_sacrebleu_drops_none_but_not_empty_or_missing_references() -> None:
    """What the padding has to be: sacrebleu drops ``None`` only. An empty string is a real,
    empty reference (a short prediction's closest reference length becomes 0), and a shorter
    stream silently truncates the corpus to its length."""
    hypotheses = ["a dog", "the cat sat on the mat"]
    first = ["a dog ran in the park today", "the cat sat on the mat"]
    padded = sacrebleu.corpus_bleu(
        hypotheses, _streams_by_hand([[first[0]], [first[1], "the cat sat on a mat"]])
    )
    assert padded.ref_len == 7 + 6  # "a dog" is held to its one reference's 7 words
    assert padded.score == bleu(hypotheses, [first[0], [first[1], "the cat sat on a mat"]])
    # an empty reference is closer to "a dog" (0 words off by 2, 7 by 5): a brevity penalty lost
    assert sacrebleu.corpus_bleu(hypotheses, [first, ["", "the cat sat on a mat"]]).ref_len == 0 + 6
    truncated = sacrebleu.corpus_bleu(hypotheses, [first, ["the cat"]])
    assert truncated.sys_len == 2  # the second hypothesis was dropped without a word


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_bleu_with_several_references_is_sacrebleus(cut: int) -> None:
    predictions, references = PREDICTIONS[:cut], REFERENCES[:cut]
    expected = sacrebleu.corpus_bleu(predictions, _streams_by_hand(references)).score
    assert bleu(predictions, references) == expected
    assert bleu_from_statistics(bleu_statistics(predictions, references)) == expected


@pytest.mark.parametrize("seed", range(3))
def test_bleu_and_chrf_statistics_reproduce_sacrebleu_on_resamples(seed: int) -> None:
    predictions, references = _random_corpus(seed, 40)
    bleu_stats = bleu_statistics(predictions, references)
    chrf_stats = chrf_statistics(predictions, references)
    streams = _streams_by_hand(references)
    assert bleu_from_statistics(bleu_stats) == sacrebleu.corpus_bleu(predictions, streams).score
    assert chrf_from_statistics(chrf_stats) == sacrebleu.corpus_chrf(predictions, streams).score
    rng = np.random.default_rng(seed)
    for idx in rng.integers(0, len(predictions), size=(5, len(predictions))):
        hyps = [predictions[i] for i in idx]
        refs = _streams_by_hand([references[i] for i in idx])
        assert bleu_from_statistics(bleu_stats[idx]) == sacrebleu.corpus_bleu(hyps, refs).score
        assert chrf_from_statistics(chrf_stats[idx]) == sacrebleu.corpus_chrf(hyps, refs).score


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_chrf_with_several_references_is_sacrebleus(cut: int) -> None:
    predictions, references = PREDICTIONS[:cut], REFERENCES[:cut]
    streams = _streams_by_hand(references)
    expected = sacrebleu.corpus_chrf(predictions, streams).score
    assert expected == sacrebleu.CHRF().corpus_score(predictions, streams).score
    assert chrf(predictions, references) == expected
    assert chrf_from_statistics(chrf_statistics(predictions, references)) == expected


def test_one_reference_per_prediction_scores_as_before() -> None:
    """A lone string, a one-element list and sacrebleu's single stream agree; the statistics
    are the one-reference ``sentence_score`` counts they always were."""
    predictions, nested = _random_corpus(7, 30)
    single = [refs[0] for refs in nested]
    wrapped = [[r] for r in single]
    assert bleu(predictions, single) == sacrebleu.corpus_bleu(predictions, [single]).score
    assert bleu(predictions, wrapped) == bleu(predictions, single)
    metric = sacrebleu.BLEU(effective_order=True)
    before = [metric.sentence_score(p, [r]) for p, r in zip(predictions, single, strict=True)]
    counts = [[*s.counts, *s.totals, s.sys_len, s.ref_len] for s in before]
    assert np.array_equal(bleu_statistics(predictions, single), np.array(counts))
    assert np.array_equal(bleu_statistics(predictions, wrapped), np.array(counts))
    assert chrf(predictions, single) == sacrebleu.corpus_chrf(predictions, [single]).score
    for name, values in example_scores(predictions, single).items():
        assert np.array_equal(values, example_scores(predictions, wrapped)[name]), name
    assert generation_metrics(predictions, single) == generation_metrics(predictions, wrapped)


def test_rouge_l_with_several_references_is_rouge_scores_score_multi() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    predictions, references = _random_corpus(11, 300)
    predictions += PREDICTIONS
    references += REFERENCES
    expected = [scorer.score_multi(refs, p)["rougeL"].fmeasure for p, refs in
                zip(predictions, references, strict=True)]  # fmt: skip
    assert list(example_scores(predictions, references)["rouge_l"]) == expected
    assert rouge_l(predictions, references) == sum(expected) / len(expected)


def test_token_f1_and_exact_match_take_the_best_reference() -> None:
    # "cat sat" against "the cat sat on mat" (normalised "cat sat on mat": P 1, R 1/2, F1 2/3)
    # and against "cat sat" (1.0): the best is 1.0; "dog" against "bird": 0
    assert token_f1("cat sat", "the cat sat on mat") == pytest.approx(2 / 3)
    assert mean_token_f1(["cat sat", "dog"], [["the cat sat on mat", "cat sat"], ["bird"]]) == 0.5
    assert exact_match([" b ", "c"], [["a", "b"], ["d", "e", "f"]]) == 0.5
    scores = example_scores(["b", "c"], [["a", "b"], ["c d"]])
    assert list(scores["exact_match"]) == [1.0, 0.0]
    assert scores["rouge_l"][1] == rouge_l_score("c", "c d")
