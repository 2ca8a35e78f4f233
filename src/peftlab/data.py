"""User data files: JSONL or CSV rows of ``prompt``/``completion`` or ``text``/``label``.

``text``/``label`` rows become classification examples: the prompt asks for the label and the
completion is the label name, so one causal-LM loop trains and scores both kinds. Bad rows are
errors that name the file, the line and the missing field; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.tasks import Example, Task, parse_json_object

KINDS = ("generation", "classification")


@dataclass(frozen=True)
class DataFile:
    examples: tuple[Example, ...]
    kind: str
    labels: tuple[str, ...]  # classification label names, sorted; empty for generation


def classification_prompt(text: str, labels: Sequence[str]) -> str:
    return f"Text: {text}\nLabel ({' / '.join(labels)}):"


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(f"{path}: unknown data format {suffix!r}; use .jsonl or .csv")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save the file as UTF-8") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".jsonl", ".json"):
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({err.msg}); one object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    else:
        reader = csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            rows.append((reader.line_num, dict(row)))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_data_file(path: str | Path) -> DataFile:
    """Read prompt/completion or text/label rows; the first row decides which."""
    p = Path(path)
    rows = _rows(p)
    first = rows[0][1]
    if "prompt" in first or "completion" in first:
        kind, fields = "generation", ("prompt", "completion")
    elif "text" in first or "label" in first:
        kind, fields = "classification", ("text", "label")
    else:
        raise ValueError(
            f"{p}:{rows[0][0]}: expected fields prompt/completion or text/label, found "
            f"{', '.join(sorted(first)) or 'none'}"
        )
    pairs: list[tuple[str, str]] = []
    for number, row in rows:
        values = []
        for name in fields:
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(
                    f"{p}:{number}: missing field {name!r} (every row needs {' and '.join(fields)})"
                )
            values.append(str(value).strip() if name in ("label", "text") else str(value))
        pairs.append((values[0], values[1]))
    if kind == "generation":
        return DataFile(tuple(Example(a, b) for a, b in pairs), kind, ())
    labels = tuple(sorted({label for _, label in pairs}))
    if len(labels) < 2:
        raise ValueError(f"{p}: classification needs at least two distinct labels, found {list(labels)}")
    examples = tuple(Example(classification_prompt(text, labels), " " + label) for text, label in pairs)
    return DataFile(examples, kind, labels)


def _score_generation(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    out = {"exact_match": exact / len(references)}
    if all(parse_json_object(r) is not None for r in references):
        parsed = sum(parse_json_object(p) is not None for p in predictions)
        out["valid_json"] = parsed / len(references)
    return out


def _score_labels(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    hits = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references, strict=True))
    return {"accuracy": hits / len(references)}


def task_from_files(
    path: str | Path,
    *,
    eval_path: str | Path | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Task:
    """A :class:`~peftlab.tasks.Task` from a user's file (eval split by fraction or a second file)."""
    data = load_data_file(path)
    if eval_path is not None:
        held = load_data_file(eval_path)
        if held.kind != data.kind:
            raise ValueError(f"{eval_path}: holds {held.kind} rows but {path} holds {data.kind} rows")
        train, evals = list(data.examples), list(held.examples)
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval fraction must be in (0, 1), got {eval_fraction}")
        examples = list(data.examples)
        random.Random(seed).shuffle(examples)
        n_eval = max(1, round(len(examples) * eval_fraction))
        if n_eval >= len(examples):
            raise ValueError(f"{path}: {len(examples)} rows are too few to hold out an eval split")
        evals, train = examples[:n_eval], examples[n_eval:]
    longest = max(len(ex.completion) for ex in (*train, *evals))
    return Task(
        name=Path(path).stem,
        description=f"user data from {path} ({data.kind}"
        + (f"; labels: {', '.join(data.labels)}" if data.labels else "")
        + ")",
        train=tuple(train),
        eval=tuple(evals),
        scorer=_score_labels if data.kind == "classification" else _score_generation,
        metric="accuracy" if data.kind == "classification" else "exact_match",
        max_new_tokens=max_new_tokens or min(128, max(8, longest // 2 + 8)),
    )
