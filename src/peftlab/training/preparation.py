"""One run preparation for every command that trains: the task read, its splits fitted within
lengths taken from the data, and the fingerprint a rerun is checked against.

``peftlab train`` and ``peftlab compare`` both go through here, so a row is read, skipped,
cut and counted the same way whichever command reads it:

1. :func:`load_task`: a built-in task, a user's JSONL/CSV file or a Hugging Face dataset
   (bad rows skipped, counted and named with file and line, see :mod:`peftlab.data.files`);
2. :func:`plan_run_lengths`: the max length from the training rows, within the context and an
   activation budget of :data:`MEMORY_BUDGET_BYTES` at the run's batch size
   (:mod:`peftlab.training.fitting`, :mod:`peftlab.training.memory`);
3. :func:`fit_split`: each split encoded within that length, over-long rows cut or skipped,
   the source's bad rows added to the count of the split they were read for;
4. :func:`data_fingerprint`: what a resumed run must see again.

:func:`prepare_data` runs steps 2-3 for a set of named splits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.data.catalog import get_task
from peftlab.data.files import stratified_split, task_from_files
from peftlab.data.hf_datasets import task_from_hf_dataset
from peftlab.data.tasks import Example, Task
from peftlab.training.classify import encode_texts
from peftlab.training.encoding import Encoded
from peftlab.training.fitting import (
    FitReport,
    LengthPlan,
    PromptFormat,
    check_lost,
    context_length,
    example_lengths,
    fit_examples,
    plan_lengths,
)
from peftlab.training.memory import activation_assumption

# the activation memory one batch may take at the chosen length (what caps lengths from the data)
MEMORY_BUDGET_BYTES = 4 * 2**30


def load_task(
    *,
    task: str | None = None,
    data: str | None = None,
    eval_data: str | None = None,
    hf_dataset: str | None = None,
    eval_fraction: float,
    seed: int,
) -> Task:
    """The run's task: ``data`` (with ``eval_data`` or ``eval_fraction`` held out), else
    ``hf_dataset``, else the built-in ``task``."""
    if data:
        return task_from_files(data, eval_path=eval_data, eval_fraction=eval_fraction, seed=seed)
    if hf_dataset:
        return task_from_hf_dataset(hf_dataset, eval_fraction=eval_fraction, seed=seed)
    if not task:
        raise ValueError("no data: give a built-in task, a data file or a Hugging Face dataset")
    return get_task(task, seed=seed)


def carve_validation(
    examples: Sequence[Example], size: int, salt: str
) -> tuple[list[Example], list[Example]]:
    """(rest, validation): ``size`` rows held out of ``examples`` (stratified by label), so the
    held-out split is never looked at before the final runs."""
    if len(examples) < 2 * size:
        raise ValueError(
            f"{len(examples)} training rows are too few to hold out {size} for validation and train on "
            "the rest; add rows (or pass --quick for a small run)"
        )
    return stratified_split(list(examples), size / len(examples), salt=salt)


@dataclass
class Split:
    """One split as a run uses it: the examples kept, their encodings, what was cut or skipped."""

    examples: list[Example]
    encoded: list[Encoded]
    fit: FitReport


@dataclass(frozen=True)
class RowEncoder:
    """How a run turns rows into tokens: a causal LM's :class:`PromptFormat` (prompt, then the
    completion it learns), or an encoder's text with its class index (``labels`` given)."""

    tokenizer: Any
    fmt: PromptFormat | None = None
    labels: tuple[str, ...] | None = None

    @property
    def is_encoder(self) -> bool:
        return self.labels is not None

    def lengths(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        """(prompt tokens, completion tokens) of each row; an encoder's text is all prompt."""
        if self.is_encoder:
            return [(self.text_length(ex), 0) for ex in examples]
        return example_lengths(self.tokenizer, examples, self.fmt)

    def text_length(self, example: Example) -> int:
        return len(self.tokenizer(example.text or "")["input_ids"])

    def fit(self, examples: Sequence[Example], max_length: int, part: str) -> Split:
        if self.labels is None:
            kept, encoded, report = fit_examples(
                self.tokenizer, examples, max_length, part=part, fmt=self.fmt
            )
            return Split(kept, encoded, report)
        # an encoder's text is cut from the end by its tokenizer; there is no completion to keep
        encoded = encode_texts(self.tokenizer, examples, self.labels, max_length)
        report = FitReport(part, rows=len(examples), kept=len(examples))
        for ex, enc in zip(examples, encoded, strict=True):
            full = self.text_length(ex)
            if full > len(enc.input_ids):
                report.add_truncated(
                    f"{ex.source or part}: text of {full} tokens cut to {len(enc.input_ids)}"
                )
        return Split(list(examples), encoded, report)


def plan_run_lengths(
    model: nn.Module,
    encoder: RowEncoder,
    train: Sequence[Example],
    *,
    requested: int | None,
    batch_size: int,
    param_bytes: int,
    budget_bytes: int = MEMORY_BUDGET_BYTES,
) -> LengthPlan:
    """The run's max length: ``requested``, else from the training rows within the model's
    context and ``budget_bytes`` of activations at ``batch_size`` (``param_bytes`` per value)."""
    acts = activation_assumption(getattr(model, "config", None), model, 1, 1)
    return plan_lengths(
        encoder.lengths(train),
        requested=requested,
        context=context_length(model),
        bytes_per_token=acts.bytes(param_bytes),
        batch_size=batch_size,
        budget_bytes=budget_bytes,
    )


def fit_split(
    encoder: RowEncoder,
    examples: Sequence[Example],
    plan: LengthPlan,
    part: str,
    *,
    unreadable: Mapping[str, Any] | None = None,
) -> Split:
    """``examples`` encoded within ``plan``'s length; ``unreadable`` (a source's row report, see
    :class:`peftlab.data.files.RowReport`) adds the rows skipped when the source was read.
    More than the allowed share of rows lost to the length is an error (:func:`check_lost`)."""
    split = encoder.fit(examples, plan.max_length, part)
    check_lost(split.fit, plan)
    if unreadable:
        split.fit.add_unreadable(int(unreadable["skipped"]), list(unreadable["first_problems"]))
    return split


def source_reports(task: Task) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the training source's row report, the held-out source's or None): a task read from a
    file holds one per file (:func:`peftlab.data.files.make_task`); built-in tasks none."""
    rows = list(task.info.get("rows") or [])
    return (rows[0] if rows else None), (rows[1] if len(rows) > 1 else None)


@dataclass
class PreparedData:
    """A run's splits, encoded within one length plan."""

    plan: LengthPlan
    splits: dict[str, Split]

    def fingerprint(self, *parts: str) -> str:
        """:func:`data_fingerprint` of the named splits (all of them by default)."""
        return data_fingerprint(*(self.splits[p].encoded for p in (parts or tuple(self.splits))))

    def rows(self) -> dict[str, dict[str, Any]]:
        """What happened to each split's rows, for results and metrics files."""
        return {name: split.fit.to_dict() for name, split in self.splits.items()}


def prepare_data(
    task: Task,
    model: nn.Module,
    encoder: RowEncoder,
    parts: Mapping[str, Sequence[Example]],
    *,
    held_out: str,
    requested_length: int | None,
    batch_size: int,
    param_bytes: int,
    budget_bytes: int = MEMORY_BUDGET_BYTES,
) -> PreparedData:
    """Plan lengths on the first of ``parts`` (the training rows) and fit every part. The task's
    unreadable rows count against the first part (the training source) and, when the task has a
    held-out source of its own, against ``held_out``."""
    names = list(parts)
    plan = plan_run_lengths(
        model,
        encoder,
        parts[names[0]],
        requested=requested_length,
        batch_size=batch_size,
        param_bytes=param_bytes,
        budget_bytes=budget_bytes,
    )
    train_rows, held_rows = source_reports(task)
    unreadable = {names[0]: train_rows, held_out: held_rows}
    splits = {
        name: fit_split(encoder, examples, plan, name, unreadable=unreadable.get(name))
        for name, examples in parts.items()
    }
    return PreparedData(plan, splits)


def data_fingerprint(*splits: Sequence[Encoded]) -> str:
    """SHA-256 of the splits as encoded (each followed by a separator): a resumed run, or a
    rerun into the same comparison, must see the same data."""
    digest = hashlib.sha256()
    for split in splits:
        for ex in split:
            digest.update(json.dumps([ex.input_ids, ex.labels], separators=(",", ":")).encode())
        digest.update(b"|")
    return digest.hexdigest()
