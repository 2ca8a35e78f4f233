"""Quality metrics on hand-checked examples."""

from __future__ import annotations

import math

import pytest

from peftlab.data.metrics import (
    classification_metrics,
    exact_match,
    generation_metrics,
    label_scorer,
    match_label,
    normalize_answer,
    perplexity,
    rouge_l,
    token_f1,
)


def test_token_f1_by_hand() -> None:
    # articles and punctuation go, case folds: identical after normalisation
    assert normalize_answer("The  Cat sat, on a mat!") == "cat sat on mat"
    assert token_f1("The cat sat on the mat.", "a cat sat on mat") == 1.0
    # pred {cat x2, dog}, ref {cat, dog x2, bird}: overlap 2, P = 2/3, R = 2/4, F1 = 4/7
    assert token_f1("cat cat dog", "cat dog dog bird") == pytest.approx(4 / 7)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing


def test_rouge_l_by_hand() -> None:
    # LCS "the cat on mat" = 4 of 6 tokens each way
    assert rouge_l(["the cat lay on a mat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # LCS a c e = 3: P = 3/5, R = 3/3, F = 0.75; and "Police killed..." vs "police kill...": 3/4
    preds = ["a b c d e", "Police killed the gunman"]
    refs = ["a c e", "police kill the gunman"]
    assert rouge_l(preds, refs) == pytest.approx((0.75 + 0.75) / 2)
    assert rouge_l(["x y"], ["z"]) == 0.0


def test_exact_match_and_generation_metrics() -> None:
    assert exact_match([" x ", "y"], ["x", "z"]) == 0.5
    scores = generation_metrics(["the cat sat", "no"], ["cat sat", "yes"])
    assert scores["exact_match"] == 0.0
    assert scores["token_f1"] == pytest.approx(0.5)
    # "the cat sat" vs "cat sat": LCS 2, P = 2/3, R = 1, F = 0.8; "no" vs "yes": 0
    assert scores["rouge_l"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_macro_f1_by_hand() -> None:
    # pos: TP 2, FN 1 -> F1 0.8; neg: TP 1, FP 1 -> F1 2/3
    scores = classification_metrics(["pos", "neg", "pos", "neg"], ["pos", "pos", "pos", "neg"])
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # a prediction that is no label is a miss for its class (F1 0 for a, 1 for b)
    assert classification_metrics(["", "b"], ["a", "b"], labels=["a", "b"]) == {
        "accuracy": 0.5,
        "macro_f1": 0.5,
    }
    # always predicting the majority class: accuracy looks fine, macro-F1 does not
    majority = classification_metrics(["a"] * 4, ["a", "a", "a", "b"])
    assert majority["accuracy"] == 0.75 and majority["macro_f1"] == pytest.approx((6 / 7) / 2)


def test_label_matching_and_scorer() -> None:
    labels = ("not spam", "spam")
    assert match_label(" Spam.", labels) == "spam"
    assert match_label("not spam at all", labels) == "not spam"
    assert match_label("spammy", labels) is None
    score = label_scorer(labels)([" spam", "garbage", " not spam"], [" spam", " spam", " not spam"])
    assert score["accuracy"] == pytest.approx(2 / 3)
    assert score["valid_label"] == pytest.approx(2 / 3)
    # spam: TP 1, FN 1 -> 2/3; not spam: TP 1 -> 1
    assert score["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_perplexity() -> None:
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert perplexity(1e6) == math.inf
