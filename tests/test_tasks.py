"""Built-in tasks: deterministic splits from a seed, and scorers checked on hand-made cases."""

from __future__ import annotations

import json
import re

import pytest

from peftlab.data.catalog import get_task, task_names
from peftlab.data.generated import TOPIC_LABELS, number_words, score_structured, score_topic
from peftlab.data.metrics import parse_json_object


@pytest.mark.parametrize("name", ["structured", "topic"])
def test_same_seed_same_splits_other_seed_other_data(name: str) -> None:
    a, b = get_task(name, seed=3), get_task(name, seed=3)
    assert a.train == b.train and a.eval == b.eval
    other = get_task(name, seed=4)
    assert other.train != a.train


@pytest.mark.parametrize("name", ["structured", "topic"])
def test_splits_are_disjoint_and_sized(name: str) -> None:
    task = get_task(name, seed=0, num_train=100, num_eval=30)
    assert (len(task.train), len(task.eval)) == (100, 30)
    train_prompts = {ex.prompt for ex in task.train}
    assert len(train_prompts) == 100
    assert not train_prompts & {ex.prompt for ex in task.eval}


def test_structured_example_for_seed_0_is_fixed() -> None:
    # pinned so a change to the generator (which would change every reported score) is noticed
    first = get_task("structured", seed=0).train[0]
    assert first.prompt.endswith(
        "Text: Born in Toronto, Zoe is now a journalist in Leeds and forty-three years old.\nJSON:"
    )
    assert first.completion == ' {"name": "Zoe", "age": 43, "city": "Leeds", "job": "journalist"}'
    topic = get_task("topic", seed=0).train[0]
    assert topic.prompt.splitlines()[-2:] == [
        "Text: Nobody expected the update to matter so much, or the smartphone.",
        "Topic:",
    ]
    assert topic.completion == " technology"


def test_structured_completions_match_their_sentences() -> None:
    spelled = 0
    for ex in get_task("structured", seed=1).train:
        record = json.loads(ex.completion)
        assert list(record) == ["name", "age", "city", "job"]
        assert isinstance(record["age"], int)
        text = ex.prompt.splitlines()[-2]
        for key in ("name", "city", "job"):
            assert re.search(rf"\b{record[key]}\b", text), (key, text)
        if str(record["age"]) not in text:
            assert number_words(record["age"]) in text
            spelled += 1
    assert 0 < spelled < len(get_task("structured", seed=1).train)


def test_number_words() -> None:
    assert [number_words(n) for n in (7, 13, 19, 20, 34, 70, 99)] == [
        "seven",
        "thirteen",
        "nineteen",
        "twenty",
        "thirty-four",
        "seventy",
        "ninety-nine",
    ]
    with pytest.raises(ValueError, match=r"1\.\.99"):
        number_words(100)


def test_parse_json_object() -> None:
    assert parse_json_object(' {"a": 1}\n\nThe JSON above') == {"a": 1}
    assert parse_json_object('Sure!\n{\n  "a": [1, 2]\n}') == {"a": [1, 2]}
    assert parse_json_object("no json here") is None
    assert parse_json_object('{"a": 1') is None
    assert parse_json_object("[1, 2] {") is None


def test_score_structured_by_hand() -> None:
    refs = [
        ' {"name": "Ali", "age": 75, "city": "Vienna", "job": "librarian"}',
        ' {"name": "Mei", "age": 30, "city": "Oslo", "job": "nurse"}',
        ' {"name": "Tom", "age": 41, "city": "Lima", "job": "chef"}',
        ' {"name": "Zoe", "age": 22, "city": "Perth", "job": "pilot"}',
    ]
    preds = [
        # exact, different whitespace and key order, trailing chatter
        '{"job": "librarian", "city": "Vienna",\n "age": 75, "name": "Ali"} and more',
        # age as a string is wrong (1 field), job wrong (1 field): 2 of 4 right
        ' {"name": "Mei", "age": "30", "city": "Oslo", "job": "Nurse"}',
        # not JSON: 0 of 4
        " name: Tom, age: 41",
        # missing job, extra key: 3 of 4, not exact
        ' {"name": "Zoe", "age": 22, "city": "Perth", "extra": 1}',
    ]
    scores = score_structured(preds, refs)
    assert scores == {"exact_match": 0.25, "field_accuracy": (4 + 2 + 0 + 3) / 16, "valid_json": 0.75}


def test_score_topic_by_hand() -> None:
    assert set(TOPIC_LABELS) == {"sports", "food", "weather", "technology", "music"}
    scores = score_topic(
        [" Sports.", "food and more", "", " weather"], [" sports", " music", " food", " weather"]
    )
    assert scores == {"accuracy": 0.5, "valid_label": 0.75}


def test_task_score_defaults_to_eval_references_and_checks_lengths() -> None:
    task = get_task("topic", seed=0, num_train=5, num_eval=4)
    perfect = [ex.completion for ex in task.eval]
    assert task.score(perfect) == {"accuracy": 1.0, "valid_label": 1.0}
    with pytest.raises(ValueError, match="3 predictions for 4 references"):
        task.score(perfect[:3])


def test_unknown_task_lists_names() -> None:
    assert task_names() == ["rotten-tomatoes", "structured", "topic"]
    with pytest.raises(ValueError, match="built-in tasks are: rotten-tomatoes, structured, topic"):
        get_task("sentiment")
    with pytest.raises(ValueError, match="num_train and num_eval"):
        get_task("topic", num_eval=0)
