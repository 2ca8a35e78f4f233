"""peftlab's own macro-F1 and ROUGE-L give the reference packages' figures exactly (not within
a tolerance), so ``peftlab train`` can score without scikit-learn and rouge-score and report the
same numbers: scikit-learn's ``f1_score(average="macro", zero_division=0)`` and Google's
``rouge-score`` ``RougeScorer(["rougeL"])``, on random and awkward inputs."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer, tokenize
from sklearn.metrics import f1_score

from peftlab.data.metrics import classification_metrics, rouge_l, rouge_l_score, rouge_tokens

AWKWARD = [
    "",
    "   ",
    "!!! ...",
    "The cat sat on the mat.",
    "the the the cat",
    "Ünïcödé café naïve résumé",  # non-ASCII letters split and drop out, as in rouge-score
    "İstanbul straße ﬁne",  # lower-casing that changes length
    'x1 2y z_3 4-5 6.7 {"a": 1}',
    "tab\tnew\nline\r\nend",
    "A B C D E",
    "a c e",
    "Police killed the gunman",
    "police kill the gunman",
    '{"name": "Ada", "age": 36}',
    "数字 123 abc",
]


def _random_text(rng: random.Random) -> str:
    vocab = ["the", "cat", "Sat", "on", "mat", "dog", "a", "ran", "42", "x-y", "café", ",", ".", "!", "éa"]
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 14)))


def test_rouge_l_equals_rouge_score_exactly() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    pairs = [(p, r) for p in AWKWARD for r in AWKWARD]
    pairs += [(_random_text(rng), _random_text(rng)) for _ in range(2000)]
    for prediction, reference in pairs:
        assert rouge_tokens(prediction) == tokenize.tokenize(prediction, None), prediction
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l_score(prediction, reference) == expected, (prediction, reference)
    predictions, references = zip(*pairs, strict=True)
    mean = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs)
    assert rouge_l(predictions, references) == mean


@pytest.mark.parametrize("seed", range(4))
def test_macro_f1_equals_scikit_learn_exactly(seed: int) -> None:
    rng = random.Random(seed)
    labels = ["neg", "pos", "neutral", "mixed"][: rng.randint(2, 4)]
    for n in (1, 2, 5, 17, 200):
        references = [rng.choice(labels) for _ in range(n)]
        # predictions include strings outside the labels (a generation that named no label)
        predictions = [rng.choice([*labels, "", "other"]) for _ in range(n)]
        for given in (labels, None):
            classes = sorted(set(references)) if given is None else given
            expected = f1_score(references, predictions, labels=classes, average="macro", zero_division=0)
            ours = classification_metrics(predictions, references, given)
            assert ours["macro_f1"] == float(expected), (predictions, references, given)
            assert ours["accuracy"] == sum(p == r for p, r in zip(predictions, references, strict=True)) / n
    # a label that never occurs counts as F1 0 in the mean, as in scikit-learn
    assert classification_metrics(["a", "a"], ["a", "a"], ["a", "b"])["macro_f1"] == float(
        f1_score(["a", "a"], ["a", "a"], labels=["a", "b"], average="macro", zero_division=0)
    )
