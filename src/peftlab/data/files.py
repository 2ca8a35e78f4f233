"""User data: JSONL or CSV files, or a Hugging Face dataset, of ``prompt``/``completion``,
``text``/``label`` or chat (``messages``) rows, turned into a :class:`~peftlab.data.tasks.Task`.

Chat rows are the format of OpenAI fine-tuning files and TRL's conversational datasets:
``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` with at least
one assistant turn (several are fine: every one is learned). Turns after the last assistant
turn teach nothing and are left out. An unknown role, a turn without text, no assistant turn or
``messages`` that is not a list makes the row bad.

``text``/``label`` rows become classification examples: the prompt lists the labels and the
completion is the label name (what a causal LM learns and is scored on), and each example keeps
its raw text and label for encoders with a classification head. Label names are discovered from
the data and sorted.

Bad rows (invalid JSON, a missing or empty field, a stray CSV column) are skipped and counted,
and the first few reasons, each naming the file and line, go into ``Task.info`` and from there
into every report: nothing is dropped without a count. More than ``MAX_BAD_FRACTION`` of the rows
bad, or no good row at all, is an error instead, since the file is then more likely misread than
noisy.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from peftlab.data.metrics import label_scorer, score_generation
from peftlab.data.tasks import Example, Task

KINDS = ("generation", "classification", "chat")
FIELDS = {"generation": ("prompt", "completion"), "classification": ("text", "label"), "chat": ("messages",)}
CHAT_ROLES = ("system", "user", "assistant")
# above this share of bad rows the input is rejected rather than cleaned
MAX_BAD_FRACTION = 0.1
# how many skipped-row reasons a report quotes (the count is always complete)
REPORTED_PROBLEMS = 5

T = TypeVar("T")


@dataclass
class RowReport:
    """What happened to the rows of one source: read, used, skipped (with the first reasons)."""

    source: str
    rows_read: int = 0
    rows_used: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.problems) < REPORTED_PROBLEMS:
            self.problems.append(reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "skipped": self.skipped,
            "first_problems": list(self.problems),
        }

    def check(self, max_bad_fraction: float = MAX_BAD_FRACTION) -> None:
        """Raise when no row is usable or too many rows are bad, quoting the reasons."""
        reasons = "; ".join(self.problems)
        if self.rows_used == 0:
            raise ValueError(f"{self.source}: no usable rows ({self.skipped} bad: {reasons})")
        if self.skipped > max_bad_fraction * self.rows_read:
            raise ValueError(
                f"{self.source}: {self.skipped} of {self.rows_read} rows are bad (more than "
                f"{max_bad_fraction:.0%}), so the file is probably not in the expected format; "
                f"first problems: {reasons}"
            )


@dataclass(frozen=True)
class Records:
    """Validated (text, label) or (prompt, completion) pairs from one source, each with the
    place it came from (``file:line``)."""

    kind: str
    pairs: tuple[tuple[str, str], ...]
    report: RowReport
    sources: tuple[str, ...] = ()
    conversations: tuple[tuple[tuple[str, str], ...], ...] = ()  # chat rows: (role, content) turns


@dataclass(frozen=True)
class DataFile:
    examples: tuple[Example, ...]
    kind: str
    labels: tuple[str, ...]  # classification label names, sorted; empty for generation
    report: RowReport


def classification_prompt(text: str, labels: Sequence[str]) -> str:
    return f"Text: {text}\nLabel ({' / '.join(labels)}):"


# ---- reading rows ----------------------------------------------------------------------


def _file_rows(path: Path, report: RowReport) -> Iterable[tuple[str, dict[str, Any]]]:
    """(location, row dict) for each parseable row; unparseable rows go to ``report``."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(f"{path}: unknown data format {suffix!r}; use .jsonl or .csv")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save the file as UTF-8") from None
    if suffix in (".jsonl", ".json"):
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            report.rows_read += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                report.skip(f"{path}:{number}: not valid JSON ({err.msg}); one object per line")
                continue
            if not isinstance(row, dict):
                report.skip(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                continue
            yield f"{path}:{number}", row
        return
    reader = csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    try:
        for row in reader:
            report.rows_read += 1
            where = f"{path}:{reader.line_num}"
            if None in row:  # DictReader files surplus cells under the key None
                report.skip(f"{where}: {len(row) - 1 + len(row[None])} cells for {len(row) - 1} columns")
                continue
            yield where, dict(row)
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: unreadable CSV ({err})") from None


def _kind_of(row: dict[str, Any], where: str) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "generation"
    if "text" in row or "label" in row:
        return "classification"
    raise ValueError(
        f"{where}: expected fields prompt/completion, text/label or messages (chat), found "
        f"{', '.join(sorted(row)) or 'none'}"
    )


def _value(row: dict[str, Any], name: str) -> str | None:
    """The field as text, or None when it is missing, empty or not a scalar."""
    value = row.get(name)
    if isinstance(value, (bool, int, float)):
        return str(value) if name == "label" else None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip() if name in ("text", "label") else value


def conversation(value: Any) -> tuple[tuple[str, str], ...] | str:
    """A chat row's ``messages`` as (role, content) turns up to the last assistant turn, or the
    reason the row is bad."""
    if not isinstance(value, list) or not value:
        return '\'messages\' must be a non-empty list of {"role", "content"} objects'
    turns: list[tuple[str, str]] = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"message {number} is a {type(message).__name__}, not a {{role, content}} object"
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            return f"message {number} has unknown role {role!r} (roles: {', '.join(CHAT_ROLES)})"
        if not isinstance(content, str) or not content.strip():
            return f"message {number} ({role}) has no text content"
        turns.append((role, content))
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        return "no assistant turn to learn from (a chat row needs at least one)"
    return tuple(turns[: last + 1])


def chat_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """A plain-text view of a conversation (the turns before its last assistant turn)."""
    return "\n".join(f"{role}: {content}" for role, content in turns)


def collect_records(
    rows: Iterable[tuple[str, dict[str, Any]]], report: RowReport, kind: str | None = None
) -> Records:
    """Validate rows into pairs; the first parseable row decides the kind unless ``kind`` is given."""
    pairs: list[tuple[str, str]] = []
    sources: list[str] = []
    chats: list[tuple[tuple[str, str], ...]] = []
    for where, row in rows:
        if kind is None:
            kind = _kind_of(row, where)
        if kind == "chat":
            if "messages" not in row:
                report.skip(f"{where}: missing field 'messages' (the file holds chat rows)")
                continue
            turns = conversation(row["messages"])
            if isinstance(turns, str):
                report.skip(f"{where}: {turns}")
                continue
            chats.append(turns)
            pairs.append((chat_prompt(turns[:-1]), turns[-1][1]))
            sources.append(where)
            continue
        names = FIELDS[kind]
        values = [_value(row, name) for name in names]
        missing = [name for name, v in zip(names, values, strict=True) if v is None]
        if missing:
            report.skip(
                f"{where}: missing field {missing[0]!r} (every row needs {' and '.join(names)} as "
                "non-empty text)"
            )
            continue
        pairs.append((str(values[0]), str(values[1])))
        sources.append(where)
    report.rows_used = len(pairs)
    report.check()
    return Records(kind or "generation", tuple(pairs), report, tuple(sources), tuple(chats))


def read_records(path: str | Path) -> Records:
    p = Path(path)
    report = RowReport(str(p))
    return collect_records(_file_rows(p, report), report)


def build_examples(records: Records, labels: Sequence[str]) -> tuple[Example, ...]:
    if records.kind == "chat":
        return tuple(
            Example(a, b, messages=turns, source=s)
            for (a, b), turns, s in zip(records.pairs, records.conversations, _sources(records), strict=True)
        )
    if records.kind == "generation":
        return tuple(
            Example(a, b, source=s) for (a, b), s in zip(records.pairs, _sources(records), strict=True)
        )
    return tuple(
        Example(classification_prompt(text, labels), " " + label, text=text, label=label, source=s)
        for (text, label), s in zip(records.pairs, _sources(records), strict=True)
    )


def _sources(records: Records) -> tuple[str | None, ...]:
    return records.sources or (None,) * len(records.pairs)


def _labels(*sources: Records) -> tuple[str, ...]:
    labels = tuple(sorted({label for r in sources for _, label in r.pairs}))
    if len(labels) < 2:
        names = ", ".join(r.report.source for r in sources)
        raise ValueError(f"{names}: classification needs at least two distinct labels, found {list(labels)}")
    return labels


def load_data_file(path: str | Path) -> DataFile:
    """Read prompt/completion, text/label or chat rows; the first good row decides which."""
    records = read_records(path)
    labels = _labels(records) if records.kind == "classification" else ()
    return DataFile(build_examples(records, labels), records.kind, labels, records.report)


# ---- splitting ------------------------------------------------------------------------


def _hash_order(items: Sequence[T], key: Callable[[T], str], salt: str) -> list[T]:
    """``items`` in the order of a salted sha256 of their key: a shuffle that depends only on
    the salt and each item's content, never on the input order or the Python version."""
    return sorted(items, key=lambda item: hashlib.sha256(f"{salt}\0{key(item)}".encode()).digest())


def interleave(groups: Sequence[Sequence[T]]) -> list[T]:
    """Merge groups so that every prefix holds each group in proportion (within one item):
    item i of a group of n sits at position (i + 0.5) / n of the merged order."""
    keyed = [((i + 0.5) / len(g), gi, item) for gi, g in enumerate(groups) for i, item in enumerate(g)]
    return [item for _, _, item in sorted(keyed, key=lambda t: (t[0], t[1]))]


def stratified_split(
    examples: Sequence[Example], eval_fraction: float, salt: str
) -> tuple[list[Example], list[Example]]:
    """(train, eval): within each label (one group for generation data) a salted hash order,
    the first ``round(n * eval_fraction)`` to eval; each split then interleaved by label, so any
    prefix of it keeps the label proportions."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    by_label: dict[str | None, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    train_groups, eval_groups = [], []
    for label in sorted(by_label, key=str):
        group = _hash_order(by_label[label], lambda ex: f"{ex.text or ex.prompt}\0{ex.completion}", salt)
        n_eval = round(len(group) * eval_fraction)
        train_groups.append(group[n_eval:])
        eval_groups.append(group[:n_eval])
    train, evals = interleave([g for g in train_groups if g]), interleave([g for g in eval_groups if g])
    if not evals or not train:
        raise ValueError(
            f"{len(examples)} rows are too few to hold out {eval_fraction:.0%} for evaluation; "
            "add rows, raise --eval-fraction or pass --eval-data"
        )
    return train, evals


# ---- tasks ----------------------------------------------------------------------------


def make_task(
    name: str,
    source: str,
    kind: str,
    labels: tuple[str, ...],
    train: Sequence[Example],
    evals: Sequence[Example],
    reports: Sequence[RowReport],
    *,
    split: str,
    max_new_tokens: int | None = None,
) -> Task:
    longest = max(len(ex.completion) for ex in (*train, *evals))
    info: dict[str, Any] = {
        "source": source,
        "kind": kind,
        "labels": list(labels),
        "split": split,
        "train_examples": len(train),
        "eval_examples": len(evals),
        "rows": [r.to_dict() for r in reports],
        "skipped_rows": sum(r.skipped for r in reports),
    }
    if labels:
        info["label_counts"] = {
            part: {label: sum(ex.label == label for ex in exs) for label in labels}
            for part, exs in (("train", train), ("eval", evals))
        }
    return Task(
        name=name,
        description=f"{source} ({kind}" + (f"; labels: {', '.join(labels)}" if labels else "") + ")",
        train=tuple(train),
        eval=tuple(evals),
        scorer=label_scorer(labels) if labels else score_generation,
        metric="accuracy" if labels else "exact_match",
        max_new_tokens=max_new_tokens or min(128, max(8, longest // 2 + 8)),
        labels=labels,
        info=info,
    )


def task_from_records(
    name: str,
    source: str,
    records: Records,
    held: Records | None,
    *,
    eval_fraction: float,
    seed: int,
    max_new_tokens: int | None,
) -> Task:
    if held is not None and held.kind != records.kind:
        raise ValueError(
            f"{held.report.source}: holds {held.kind} rows but {records.report.source} holds "
            f"{records.kind} rows"
        )
    sources = (records,) if held is None else (records, held)
    labels = _labels(*sources) if records.kind == "classification" else ()
    examples = build_examples(records, labels)
    if held is None:
        train, evals = stratified_split(examples, eval_fraction, salt=f"peftlab-split-{seed}")
        split = (
            f"{eval_fraction:.0%} held out"
            + (" per label" if labels else "")
            + f" by a seeded hash order (seed {seed})"
        )
    else:
        train, evals = list(examples), list(build_examples(held, labels))
        split = f"eval from {held.report.source}"
    return make_task(
        name,
        source,
        records.kind,
        labels,
        train,
        evals,
        [r.report for r in sources],
        split=split,
        max_new_tokens=max_new_tokens,
    )


def task_from_files(
    path: str | Path,
    *,
    eval_path: str | Path | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Task:
    """A :class:`~peftlab.data.tasks.Task` from a user's file (eval split by fraction or a second file).

    Classification files are split per label, so train and eval keep the label proportions.
    """
    records = read_records(path)
    held = read_records(eval_path) if eval_path is not None else None
    return task_from_records(
        Path(path).stem,
        f"user data from {path}",
        records,
        held,
        eval_fraction=eval_fraction,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
