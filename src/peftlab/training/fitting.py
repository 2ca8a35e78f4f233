"""Sequence lengths taken from the data, and rows that do not fit: cut or skipped and counted,
never the end of a run.

:func:`plan_lengths` chooses the maximum sequence length from the training rows' token lengths
(prompt + completion + eos): the shortest length that covers :data:`COVERAGE` of them, capped by
the model's context and by a memory budget (activations of one batch at that length); a
requested ``--seq-len`` is used as given. The generation length at evaluation comes from the
completions: their 95th percentile plus a margin.

:func:`fit_examples` then encodes each row within the chosen length. A row that is too long
keeps its completion whole and loses the start of its prompt (leading special tokens such as
BOS are kept), as long as at least :data:`MIN_PROMPT_TOKENS` of the prompt remain; otherwise it
is skipped. Both are counted, with the first few rows named by file and line. Losing more than
:data:`MAX_LOST_FRACTION` of the rows is an error that gives the ``--seq-len`` that would fit
:data:`COVERAGE` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from peftlab.data.tasks import Example
from peftlab.training.loop import IGNORE_INDEX, Encoded, encode_completion, encode_prompt

COVERAGE = 0.95
MAX_LOST_FRACTION = 0.10
MIN_PROMPT_TOKENS = 4
# how many cut or skipped rows a report names (the counts are always complete)
REPORTED_ROWS = 5


def percentile(values: Sequence[int], fraction: float) -> int:
    """The smallest value that at least ``fraction`` of ``values`` do not exceed."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no rows to measure")
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass(frozen=True)
class LengthPlan:
    """The lengths a run uses, and why."""

    max_length: int
    max_new_tokens: int
    source: str  # "data" (chosen from the rows) or "--seq-len"
    rows: int
    median: int
    p95: int
    longest: int
    context: int | None
    budget_bytes: int | None
    budget_tokens: int | None  # the longest rows the memory budget allows at the batch size
    capped_by: str | None  # "context" / "memory budget" / None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.source == "--seq-len":
            why = "as given by --seq-len"
        else:
            why = (
                f"covers {COVERAGE:.0%} of {self.rows:,} training rows (median {self.median}, "
                f"longest {self.longest})"
            )
            if self.capped_by:
                why += f", capped by the {self.capped_by}"
        budget = ""
        if self.budget_bytes is not None and self.budget_tokens is not None:
            budget = (
                f"; memory budget {self.budget_bytes / 2**30:.1f} GiB of activations = rows up to "
                f"{self.budget_tokens} tokens"
            )
        context = f"; model context {self.context}" if self.context else ""
        return (
            f"max length {self.max_length} tokens ({why}){context}{budget}; generation up to "
            f"{self.max_new_tokens} new tokens"
        )


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions allow, when its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def example_lengths(tokenizer: Any, examples: Sequence[Example]) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens with eos) of each example, as training encodes them."""
    return [
        (len(encode_prompt(tokenizer, ex.prompt)), len(encode_completion(tokenizer, ex.completion)))
        for ex in examples
    ]


def generation_length(completion_lengths: Sequence[int]) -> int:
    """New tokens to generate at evaluation: the completions' 95th percentile plus a margin."""
    p95 = percentile(completion_lengths, COVERAGE)
    return p95 + max(4, p95 // 4)


def plan_lengths(
    lengths: Sequence[tuple[int, int]],
    *,
    requested: int | None = None,
    context: int | None = None,
    bytes_per_token: int | None = None,
    batch_size: int = 1,
    budget_bytes: int | None = None,
) -> LengthPlan:
    """The run's max length (``requested``, else from the rows, see the module docstring)."""
    if not lengths:
        raise ValueError("no training rows to measure")
    totals = [p + c for p, c in lengths]
    median, p95, longest = percentile(totals, 0.5), percentile(totals, COVERAGE), max(totals)
    budget_tokens = None
    if budget_bytes is not None and bytes_per_token:
        # never below what the median row needs (a tighter budget would drop most of the data)
        budget_tokens = max(median, budget_bytes // (batch_size * bytes_per_token))
    new_tokens = generation_length([c for _, c in lengths])
    common: dict[str, Any] = {
        "rows": len(totals),
        "median": median,
        "p95": p95,
        "longest": longest,
        "context": context,
        "budget_bytes": budget_bytes,
        "budget_tokens": budget_tokens,
        "max_new_tokens": new_tokens,
    }
    if requested is not None:
        if requested < 2:
            raise ValueError(f"--seq-len must be at least 2, got {requested}")
        return LengthPlan(max_length=requested, source="--seq-len", capped_by=None, **common)
    chosen, capped_by = p95, None
    if context is not None and chosen > context:
        chosen, capped_by = context, "context"
    if budget_tokens is not None and chosen > budget_tokens:
        chosen, capped_by = budget_tokens, "memory budget"
    return LengthPlan(max_length=chosen, source="data", capped_by=capped_by, **common)


@dataclass
class FitReport:
    """What happened to the rows of one split at one max length."""

    part: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: int = 0
    first_truncated: list[str] = field(default_factory=list)
    first_skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        text = (
            f"{self.part}: {self.rows:,} rows, {self.truncated:,} prompts cut from the left, "
            f"{self.skipped:,} skipped"
        )
        if self.first_truncated:
            text += " (cut: " + "; ".join(self.first_truncated) + ")"
        if self.first_skipped:
            text += " (skipped: " + "; ".join(self.first_skipped) + ")"
        return text


def _where(example: Example, index: int, part: str) -> str:
    return example.source or f"{part} row {index + 1}"


def _leading_specials(tokenizer: Any, prompt: list[int]) -> int:
    """How many special tokens (BOS, ...) open the prompt: they are kept when it is cut."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    count = 0
    while count < len(prompt) and prompt[count] in specials:
        count += 1
    return count


def fit_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int, *, part: str
) -> tuple[list[Example], list[Encoded], FitReport]:
    """The examples that fit within ``max_length`` tokens (prompts cut from the left where
    needed), their encodings (prompt labels -100) and the report of what was cut or skipped."""
    report = FitReport(part)
    kept: list[Example] = []
    encoded: list[Encoded] = []
    for index, example in enumerate(examples):
        report.rows += 1
        prompt = encode_prompt(tokenizer, example.prompt)
        completion = encode_completion(tokenizer, example.completion)
        room = max_length - len(completion)
        if len(prompt) > room:
            head = _leading_specials(tokenizer, prompt)
            if room - head < min(MIN_PROMPT_TOKENS, len(prompt) - head):
                report.skipped += 1
                if len(report.first_skipped) < REPORTED_ROWS:
                    report.first_skipped.append(
                        f"{_where(example, index, part)}: its completion of {len(completion)} tokens leaves "
                        f"no room for the prompt within {max_length}"
                    )
                continue
            report.truncated += 1
            if len(report.first_truncated) < REPORTED_ROWS:
                report.first_truncated.append(
                    f"{_where(example, index, part)}: prompt of {len(prompt)} tokens cut to {room}"
                )
            prompt = prompt[:head] + prompt[len(prompt) - (room - head) :]
        kept.append(example)
        encoded.append(Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    report.kept = len(kept)
    return kept, encoded, report


def check_lost(report: FitReport, plan: LengthPlan) -> None:
    """Refuse a run that would lose more than :data:`MAX_LOST_FRACTION` of a split's rows."""
    if report.rows and report.skipped > MAX_LOST_FRACTION * report.rows:
        suggestion = plan.p95 if plan.context is None else min(plan.p95, plan.context)
        raise ValueError(
            f"{report.skipped:,} of {report.rows:,} {report.part} rows do not fit within max length "
            f"{plan.max_length} even with their prompts cut (more than {MAX_LOST_FRACTION:.0%}); "
            f"--seq-len {suggestion} would fit {COVERAGE:.0%} of them"
        )
