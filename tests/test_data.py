"""User data: bad-row counting, stratified splits, and --hf-dataset through a fake ``datasets``."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from peftlab.data.files import (
    MAX_BAD_FRACTION,
    interleave,
    load_data_file,
    stratified_split,
    task_from_files,
)
from peftlab.data.hf_datasets import task_from_hf_dataset
from peftlab.data.tasks import Example


def _rows(n: int, labels: tuple[str, ...] = ("neg", "pos")) -> list[dict[str, Any]]:
    return [{"text": f"review number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_rows_are_skipped_counted_and_located(tmp_path: Path) -> None:
    rows: list[Any] = _rows(40)
    rows[3] = "{not json"  # line 4
    rows[10] = {"text": "", "label": "pos"}  # line 11
    rows[20] = {"text": "ok", "label": None}  # line 21
    path = _jsonl(tmp_path / "d.jsonl", rows)
    data = load_data_file(path)
    assert (data.report.rows_read, data.report.rows_used, data.report.skipped) == (40, 37, 3)
    assert [p.split(": ", 1)[0] for p in data.report.problems] == [f"{path}:4", f"{path}:11", f"{path}:21"]
    assert "not valid JSON" in data.report.problems[0] and "'text'" in data.report.problems[1]
    task = task_from_files(path)
    assert task.info["skipped_rows"] == 3 and task.info["rows"][0]["first_problems"] == data.report.problems
    assert len(task.train) + len(task.eval) == 37


def test_csv_bad_rows(tmp_path: Path) -> None:
    lines = ["text,label", *(f"good {i},{'a' if i % 2 else 'b'}" for i in range(30))]
    lines[5] = "too,many,cells"
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    data = load_data_file(path)
    assert data.report.skipped == 1 and data.report.problems == [f"{path}:6: 3 cells for 2 columns"]


def test_too_many_or_all_bad_rows_are_an_error(tmp_path: Path) -> None:
    rows: list[Any] = _rows(20)
    n_bad = int(20 * MAX_BAD_FRACTION) + 1
    for i in range(n_bad):
        rows[i] = {"text": f"t{i}"}
    with pytest.raises(ValueError, match=rf"{n_bad} of 20 rows are bad.*d\.jsonl:1: missing field 'label'"):
        load_data_file(_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(ValueError, match=r"no usable rows \(2 bad"):
        load_data_file(_jsonl(tmp_path / "e.jsonl", ["[1]", "{oops"]))
    with pytest.raises(
        ValueError, match=r"expected fields prompt/completion, text/label or messages \(chat\), found a, b"
    ):
        load_data_file(_jsonl(tmp_path / "f.jsonl", [{"a": 1, "b": 2}]))


def test_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", _rows(90, ("a", "a", "b")))  # 60 a, 30 b
    task = task_from_files(path, eval_fraction=0.2, seed=1)
    assert Counter(ex.label for ex in task.eval) == {"a": 12, "b": 6}
    assert Counter(ex.label for ex in task.train) == {"a": 48, "b": 24}
    assert task_from_files(path, eval_fraction=0.2, seed=1).eval == task.eval
    assert task_from_files(path, eval_fraction=0.2, seed=2).eval != task.eval
    assert not {ex.text for ex in task.train} & {ex.text for ex in task.eval}
    # any prefix of a split keeps the 2:1 proportion within one example
    for n in range(1, len(task.eval) + 1):
        count = sum(ex.label == "a" for ex in task.eval[:n])
        assert abs(count - 2 * n / 3) <= 1, n
    # the order of rows in the file does not matter
    shuffled = _jsonl(tmp_path / "s.jsonl", list(reversed(_rows(90, ("a", "a", "b")))))
    assert task_from_files(shuffled, eval_fraction=0.2, seed=1).eval == task.eval
    assert task.info["label_counts"]["eval"] == {"a": 12, "b": 6}


def test_interleave_and_split_errors() -> None:
    assert interleave([["a1", "a2", "a3", "a4"], ["b1", "b2"]]) == ["a1", "b1", "a2", "a3", "b2", "a4"]
    few = [Example("p", " c", text="t", label="x"), Example("q", " c", text="u", label="x")]
    with pytest.raises(ValueError, match="too few to hold out"):
        stratified_split(few, 0.2, salt="s")
    with pytest.raises(ValueError, match=r"eval fraction must be in \(0, 1\)"):
        stratified_split(few, 1.0, salt="s")


def test_eval_file_labels_are_the_union(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", _rows(10, ("neg", "pos")))
    held = _jsonl(tmp_path / "eval.jsonl", _rows(6, ("neutral", "pos")))
    task = task_from_files(train, eval_path=held)
    assert task.labels == ("neg", "neutral", "pos")
    assert "Label (neg / neutral / pos):" in task.train[0].prompt
    assert (len(task.train), len(task.eval)) == (10, 6) and len(task.info["rows"]) == 2
    gen = _jsonl(tmp_path / "gen.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(ValueError, match="holds generation rows"):
        task_from_files(train, eval_path=gen)


# ---- --hf-dataset ----------------------------------------------------------------------


class _ClassLabel:
    def __init__(self, names: list[str]) -> None:
        self.names = names


class _Split:
    def __init__(self, rows: list[dict[str, Any]], features: dict[str, Any] | None = None) -> None:
        self.rows = rows
        self.column_names = list(rows[0])
        self.features = features or {}

    def __iter__(self) -> Any:
        return iter(self.rows)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, splits: dict[str, _Split] | Exception) -> list[Any]:
    calls: list[Any] = []

    def load_dataset(name: str, config: str | None = None) -> dict[str, _Split]:
        calls.append((name, config))
        if isinstance(splits, Exception):
            raise splits
        return splits

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_dataset_maps_columns_and_class_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    names = _ClassLabel(["neg", "pos"])
    train = _Split([{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(20)], {"label": names})
    # GLUE-style unlabelled row (-1) is counted, not silently kept
    validation = _Split([{"sentence": "v0", "label": 1, "idx": 0}, {"sentence": "v1", "label": 0, "idx": 1}]
                        + [{"sentence": f"w{i}", "label": i % 2, "idx": i} for i in range(2, 20)]
                        + [{"sentence": "v?", "label": -1, "idx": 99}], {"label": names})  # fmt: skip
    calls = _fake_datasets(monkeypatch, {"train": train, "validation": validation, "test": train})
    task = task_from_hf_dataset("glue:sst2")
    assert calls == [("glue", "sst2")]
    assert task.labels == ("neg", "pos") and task.is_classification
    assert (len(task.train), len(task.eval)) == (20, 20)
    assert task.eval[0].text == "v0" and task.eval[0].label == "pos" and task.eval[0].completion == " pos"
    assert task.info["rows"][1]["skipped"] == 1
    assert task.info["rows"][1]["first_problems"] == [
        "glue:sst2[validation] row 20: missing field 'label' "
        "(every row needs text and label as non-empty text)"
    ]


def test_hf_dataset_generation_and_split_by_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]
    _fake_datasets(monkeypatch, {"train": _Split(rows)})
    task = task_from_hf_dataset("me/qa", eval_fraction=0.2)
    assert not task.is_classification and task.metric == "exact_match"
    assert (len(task.train), len(task.eval)) == (8, 2)
    assert set(task.score([ex.completion for ex in task.eval])) >= {"exact_match", "token_f1", "rouge_l"}


def test_hf_dataset_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"not installed: pip install 'peftlab\[hf\]'"):
        task_from_hf_dataset("imdb")
    _fake_datasets(monkeypatch, ConnectionError("offline"))
    with pytest.raises(
        RuntimeError, match=r"imdb: could not load it \(ConnectionError: offline\).*HF_DATASETS_OFFLINE"
    ):
        task_from_hf_dataset("imdb")
    _fake_datasets(monkeypatch, {"test": _Split([{"text": "a", "label": 0}])})
    with pytest.raises(ValueError, match=r"no 'train' split \(splits: test\)"):
        task_from_hf_dataset("imdb")
    _fake_datasets(monkeypatch, {"train": _Split([{"body": "a", "stars": 5}])})
    with pytest.raises(ValueError, match="columns body, stars are neither"):
        task_from_hf_dataset("imdb")
