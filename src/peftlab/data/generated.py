"""Built-in tasks, generated from a seed by our own code: no download, same data everywhere.

``structured``: a short English sentence describing a person -> a one-line JSON object with the
fields name, age, city and job (scored by exact match and per-field accuracy).
``topic``: a short sentence -> its topic as one label word (scored by accuracy).

Each task is a prompt/completion dataset with disjoint train and eval splits that depend only
on the seed, plus a scorer that takes generated completions and the reference completions.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from peftlab.data.metrics import parse_json_object
from peftlab.data.tasks import Example, Scorer, Task

# ---- structured: sentence -> JSON ------------------------------------------------------

_NAMES = (
    "Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sofia", "Ivan",
    "Fatima", "Lucas", "Mei", "David", "Amara", "Jonas", "Elena", "Kwame", "Nora", "Rahul",
    "Chloe", "Mateo", "Yuki", "Hannah", "Ali", "Greta", "Pedro", "Zoe", "Samir", "Ingrid",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Toronto", "Osaka", "Cairo", "Berlin", "Lima", "Mumbai", "Dublin", "Madrid",
    "Oslo", "Nairobi", "Seoul", "Denver", "Vienna", "Austin", "Prague", "Perth", "Quito",
    "Boston", "Milan", "Accra", "Hanoi", "Zurich", "Porto", "Leeds",
)  # fmt: skip
_JOBS = (
    "nurse", "teacher", "engineer", "baker", "pilot", "architect", "chef", "dentist", "lawyer",
    "farmer", "designer", "plumber", "librarian", "journalist", "electrician", "pharmacist",
    "photographer", "carpenter", "accountant", "musician",
)  # fmt: skip
# {a} is the job's indefinite article, so "an engineer" reads right; {other} is a second city
# that is not the answer (where the person grew up), so copying the first city is not enough
_PERSON_TEMPLATES = (
    "{name} is {age} years old and works as {a} {job} in {city}.",
    "{name}, {a} {age}-year-old {job}, lives in {city}.",
    "In {city} lives {name}, who is {age} and works as {a} {job}.",
    "{name} ({age}) is {a} {job} based in {city}.",
    "Our new {job} is {name}, {age}, from {city}.",
    "Age {age}, job {job}, home {city}: that is {name}.",
    "Say hello to {name}: {age} years old, {a} {job} from {city}.",
    "{name} grew up in {other} but now lives in {city}, working as {a} {job} at {age}.",
    "Born in {other}, {name} is now {a} {job} in {city} and {age} years old.",
)
_STRUCTURED_PROMPT = (
    "Extract the person's details as JSON with the keys name, age, city and job.\nText: {text}\nJSON:"
)
_ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen")  # fmt: skip


def number_words(n: int) -> str:
    """English words for 0 < n < 100, e.g. 34 -> "thirty-four"."""
    if not 0 < n < 100:
        raise ValueError(f"number_words covers 1..99, got {n}")
    if n < 10:
        return _ONES[n]
    if n < 20:
        return _TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def _person_example(rng: random.Random) -> Example:
    name, age, city, job = rng.choice(_NAMES), rng.randint(19, 78), rng.choice(_CITIES), rng.choice(_JOBS)
    other = rng.choice([c for c in _CITIES if c != city])
    # a third of the ages are spelled out: the JSON still wants the integer
    age_text = number_words(age) if rng.random() < 1 / 3 else str(age)
    article = "an" if job[0] in "aeiou" else "a"
    text = rng.choice(_PERSON_TEMPLATES).format(
        a=article, other=other, name=name, age=age_text, city=city, job=job
    )
    record = {"name": name, "age": age, "city": city, "job": job}
    return Example(_STRUCTURED_PROMPT.format(text=text), " " + json.dumps(record))


def score_structured(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``exact_match``: the parsed object equals the reference (types included, key order not);
    ``field_accuracy``: mean over reference fields of a correct value; ``valid_json``: a JSON
    object could be parsed at all."""
    exact = fields = valid = 0
    total_fields = 0
    for pred_text, ref_text in zip(predictions, references, strict=True):
        ref = parse_json_object(ref_text)
        if ref is None:
            raise ValueError(f"reference is not a JSON object: {ref_text!r}")
        pred = parse_json_object(pred_text)
        total_fields += len(ref)
        if pred is None:
            continue
        valid += 1
        exact += pred == ref
        # bool is an int subclass: compare types too, so "age": true never matches 1
        fields += sum(1 for k, v in ref.items() if k in pred and type(pred[k]) is type(v) and pred[k] == v)
    n = len(references)
    return {
        "exact_match": exact / n,
        "field_accuracy": fields / total_fields if total_fields else 0.0,
        "valid_json": valid / n,
    }


# ---- topic: sentence -> label word ----------------------------------------------------

_TOPIC_WORDS = {
    "sports": ("goalkeeper", "penalty", "stadium", "marathon", "referee", "tournament", "coach",
               "medal", "halftime", "racket"),
    "food": ("recipe", "pastry", "garlic", "oven", "dessert", "noodles", "spices", "bakery",
             "soup", "menu"),
    "weather": ("thunderstorm", "forecast", "snowfall", "humidity", "heatwave", "drizzle",
                "breeze", "fog", "rainbow", "hail"),
    "technology": ("smartphone", "software", "laptop", "robot", "database", "processor",
                   "update", "browser", "chip", "algorithm"),
    "music": ("guitar", "concert", "melody", "drummer", "album", "orchestra", "chorus",
              "playlist", "piano", "lyrics"),
}  # fmt: skip
_TOPIC_TEMPLATES = (
    "Everyone at work kept talking about the {a} and the {b}.",
    "I read a long article about the {a} this morning.",
    "The {a} was the best part of my weekend, apart from the {b}.",
    "My neighbour complained about the {a} again.",
    "Nobody expected the {a} to matter so much, or the {b}.",
    "We spent the whole evening discussing the {a}.",
    "Honestly, the {a} and the {b} surprised me.",
    "Have you heard the news about the {a}?",
)
TOPIC_LABELS = tuple(_TOPIC_WORDS)
_TOPIC_PROMPT = "Classify the topic as one of: " + ", ".join(TOPIC_LABELS) + ".\nText: {text}\nTopic:"


def _topic_example(rng: random.Random) -> Example:
    label = rng.choice(TOPIC_LABELS)
    a, b = rng.sample(_TOPIC_WORDS[label], 2)
    text = rng.choice(_TOPIC_TEMPLATES).format(a=a, b=b)
    return Example(_TOPIC_PROMPT.format(text=text), " " + label)


def first_word(text: str) -> str:
    """The first word of a generation, lower-cased, without surrounding punctuation."""
    words = text.strip().split()
    return words[0].strip(".,:;!?\"'()").lower() if words else ""


def score_topic(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``accuracy``: the first generated word is the label; ``valid_label``: it is some label."""
    correct = valid = 0
    for pred, ref in zip(predictions, references, strict=True):
        word = first_word(pred)
        correct += word == first_word(ref)
        valid += word in TOPIC_LABELS
    n = len(references)
    return {"accuracy": correct / n, "valid_label": valid / n}


# ---- registry -------------------------------------------------------------------------


def _split(
    make: Callable[[random.Random], Example], seed: int, num_train: int, num_eval: int
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Distinct examples (no prompt in both splits), a deterministic function of the seed."""
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train and num_eval must be >= 1, got {num_train} and {num_eval}")
    rng = random.Random(seed)
    wanted = num_train + num_eval
    seen: dict[str, Example] = {}
    attempts = 0
    while len(seen) < wanted:
        attempts += 1
        if attempts > 50 * wanted:
            raise ValueError(f"cannot generate {wanted} distinct examples; ask for fewer")
        ex = make(rng)
        seen.setdefault(ex.prompt, ex)
    examples = list(seen.values())
    return tuple(examples[:num_train]), tuple(examples[num_train:])


@dataclass(frozen=True)
class _Spec:
    description: str
    make: Callable[[random.Random], Example]
    scorer: Scorer
    metric: str
    max_new_tokens: int
    num_train: int
    num_eval: int


TASKS: dict[str, _Spec] = {
    "structured": _Spec(
        "sentence about a person -> JSON with name, age, city, job",
        _person_example,
        score_structured,
        "exact_match",
        40,
        256,
        64,
    ),
    "topic": _Spec(
        "sentence -> topic label (" + ", ".join(TOPIC_LABELS) + ")",
        _topic_example,
        score_topic,
        "accuracy",
        4,
        256,
        64,
    ),
}


def generated_task(
    name: str, *, seed: int = 0, num_train: int | None = None, num_eval: int | None = None
) -> Task:
    """The generated task ``name`` (one of :data:`TASKS`); the same ``seed`` gives the same splits."""
    spec = TASKS[name]
    train, eval_ = _split(
        spec.make,
        seed,
        spec.num_train if num_train is None else num_train,
        spec.num_eval if num_eval is None else num_eval,
    )
    return Task(name, spec.description, train, eval_, spec.scorer, spec.metric, spec.max_new_tokens)
