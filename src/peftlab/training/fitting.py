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

How a row becomes tokens is a :class:`PromptFormat`. Without a chat template the prompt is
tokenised as is and the completion follows with eos. With one (``--chat-template auto`` and a
tokenizer that has one, or a Jinja file), a prompt/completion row is a user turn and an
assistant turn, and a chat row (``messages``) is rendered whole with the template. The rendered
text is cut at the start and end of every assistant turn, found by rendering the conversation
up to that turn with the generation prompt and through it; the pieces are tokenised one by one
(as prompt and completion are, so the boundaries are exact), and every assistant turn's tokens,
its end-of-turn marker included, are supervised while everything else is -100. For fitting and
generation the *completion* is the last assistant turn and the *prompt* everything before it
(earlier assistant turns keep their labels): a row too long loses the start of that prompt.

For an encoder-decoder (``PromptFormat.seq2seq``) the same pieces become two sequences: the
prompt (a chat's conversation before its last assistant turn, rendered by the template with the
generation prompt) is the encoder's input and the completion (that last turn) the decoder's
targets; earlier assistant turns are then input, not learned. The length rule is the same:
prompt + completion within the max length, the prompt cut from the left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.data.tasks import Example
from peftlab.training.encoding import Encoded, encode_completion, encode_prompt
from peftlab.training.lm_head import IGNORE_INDEX

CHAT_TEMPLATE_CHOICES = ("auto", "none")

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


def check_chat_template(value: str) -> None:
    """``auto``, ``none`` or the path of a Jinja chat template file (checked before any loading)."""
    if value in CHAT_TEMPLATE_CHOICES:
        return
    if not Path(value).is_file():
        raise ValueError(
            f"--chat-template {value!r}: expected auto, none or a Jinja chat template file that exists"
        )


@dataclass(frozen=True)
class Pieces:
    """One row's tokens: ``context`` (the prompt, or a chat up to its last assistant turn) with its
    labels, and ``final`` (the completion + eos, or the last assistant turn), all supervised."""

    context: list[int]
    context_labels: list[int]
    final: list[int]

    def encoded(self, seq2seq: bool = False) -> Encoded:
        """Decoder-only: one sequence; ``seq2seq``: the context as the encoder's input, ``final``
        as the decoder's targets."""
        if seq2seq:
            return Encoded(list(self.context), list(self.final), seq2seq=True)
        return Encoded(self.context + self.final, self.context_labels + self.final, len(self.context))


@dataclass(frozen=True)
class PromptFormat:
    """How rows become tokens (see the module docstring): ``template`` None is the plain
    prompt + completion + eos; otherwise the chat template used (``source`` says whose).
    ``seq2seq``: rows for an encoder-decoder (prompt to the encoder, completion to the decoder)."""

    tokenizer: Any
    template: str | None = None
    source: str = "none"
    seq2seq: bool = False

    @classmethod
    def resolve(
        cls, tokenizer: Any, choice: str = "auto", *, chat_rows: bool = False, seq2seq: bool = False
    ) -> PromptFormat:
        """The format ``--chat-template choice`` asks for; chat rows without a template are an error."""
        check_chat_template(choice)
        if choice == "none":
            if chat_rows:
                raise ValueError(
                    "the data holds chat rows (messages), which need a chat template; drop "
                    "--chat-template none (or give a template file)"
                )
            return cls(tokenizer, seq2seq=seq2seq)
        if choice != "auto":
            return cls(tokenizer, Path(choice).read_text(encoding="utf-8"), choice, seq2seq)
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not template:
            if chat_rows:
                name = getattr(tokenizer, "name_or_path", "") or "the model"
                whose = "its tokenizer (an encoder-decoder's, as T5's)" if seq2seq else "its tokenizer"
                raise ValueError(
                    f"{name}: {whose} has no chat template, but the data holds chat rows (messages); "
                    "give one with --chat-template FILE.jinja, or use prompt/completion rows"
                )
            return cls(tokenizer, seq2seq=seq2seq)
        return cls(tokenizer, str(template), "tokenizer", seq2seq)

    @property
    def chat(self) -> bool:
        return self.template is not None

    def describe(self) -> str:
        if self.seq2seq:
            if not self.chat:
                return "prompt to the encoder, completion + eos as the decoder's targets (no chat template)"
            whose = "the tokenizer's" if self.source == "tokenizer" else self.source
            return f"chat template: {whose}; the encoder reads the turns before the last assistant turn"
        if not self.chat:
            return "prompt + completion as plain text (no chat template)"
        whose = "the tokenizer's" if self.source == "tokenizer" else self.source
        return f"chat template: {whose}; loss on assistant turns only"

    def render(self, messages: Sequence[dict[str, str]], *, generation_prompt: bool = False) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return str(text)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def messages(self, example: Example) -> list[dict[str, str]]:
        turns = example.messages or (("user", example.prompt), ("assistant", example.completion))
        return [{"role": role, "content": content} for role, content in turns]

    def pieces(self, example: Example) -> Pieces:
        if self.seq2seq and not example.completion and not example.messages:
            raise ValueError(
                f"{example.source or 'a row'}: an encoder-decoder learns the completion as its decoder's "
                "targets, and this row has none; give prompt/completion rows (or text/label, or chat rows)"
            )
        if not self.chat:
            prompt = encode_prompt(self.tokenizer, example.prompt)
            return Pieces(
                prompt, [IGNORE_INDEX] * len(prompt), encode_completion(self.tokenizer, example.completion)
            )
        messages = self.messages(example)
        full = self.render(messages)
        spans: list[tuple[int, int]] = []  # (start, end) of each assistant turn in ``full``
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)) or (
                spans and len(before) < spans[-1][1]
            ):
                raise ValueError(
                    f"{example.source or 'a chat row'}: the chat template does not render the "
                    "conversation as a growing prefix (it rewrites earlier turns), so the assistant "
                    "tokens cannot be found; give another template with --chat-template FILE.jinja"
                )
            # whitespace after the end-of-turn marker is not learned
            spans.append((len(before), len(before) + len(through[len(before) :].rstrip())))
        if not spans:
            raise ValueError(f"{example.source or 'a chat row'}: no assistant turn to learn from")
        ids: list[int] = []
        labels: list[int] = []
        position = 0
        for start, end in spans[:-1]:
            head, body = self._ids(full[position:start]), self._ids(full[start:end])
            ids += head + body
            labels += [IGNORE_INDEX] * len(head) + body
            position = end
        head = self._ids(full[position : spans[-1][0]])
        final = self._ids(full[spans[-1][0] : spans[-1][1]])
        return Pieces(ids + head, labels + [IGNORE_INDEX] * len(head), final)

    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn (the template's end-of-turn marker), for
        generation at evaluation; empty without a chat template (eos ends a completion)."""
        if not self.chat:
            return []
        probe = self.pieces(Example("x", "y")).final
        specials = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        return [probe[-1]] if probe and probe[-1] in specials else []


def example_lengths(
    tokenizer: Any, examples: Sequence[Example], fmt: PromptFormat | None = None
) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens) of each example as training encodes them (a chat's
    completion is its last assistant turn)."""
    fmt = fmt or PromptFormat(tokenizer)
    out = []
    for ex in examples:
        pieces = fmt.pieces(ex)
        out.append((len(pieces.context), len(pieces.final)))
    return out


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
    """What happened to the rows of one split: how many were read, cut to fit the max length,
    skipped (too long to fit, or ``unreadable``: bad rows of the source file), with the first
    few of each named by file and line."""

    part: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: int = 0
    unreadable: int = 0  # of the skipped: rows the source could not use (a missing field, bad JSON)
    first_truncated: list[str] = field(default_factory=list)
    first_skipped: list[str] = field(default_factory=list)

    @property
    def too_long(self) -> int:
        """Rows skipped because they do not fit the max length."""
        return self.skipped - self.unreadable

    def add_truncated(self, where: str) -> None:
        self.truncated += 1
        if len(self.first_truncated) < REPORTED_ROWS:
            self.first_truncated.append(where)

    def add_skipped(self, where: str) -> None:
        self.skipped += 1
        if len(self.first_skipped) < REPORTED_ROWS:
            self.first_skipped.append(where)

    def add_unreadable(self, count: int, problems: Sequence[str]) -> None:
        """Count a source's bad rows (already skipped when it was read) against this split."""
        self.rows += count
        self.skipped += count
        self.unreadable += count
        self.first_skipped = [*problems, *self.first_skipped][:REPORTED_ROWS]

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
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    *,
    part: str,
    fmt: PromptFormat | None = None,
) -> tuple[list[Example], list[Encoded], FitReport]:
    """The examples that fit within ``max_length`` tokens (prompts cut from the left where
    needed), their encodings (``fmt``: plain prompt + completion by default) and the report of
    what was cut or skipped."""
    fmt = fmt or PromptFormat(tokenizer)
    report = FitReport(part)
    kept: list[Example] = []
    encoded: list[Encoded] = []
    for index, example in enumerate(examples):
        report.rows += 1
        pieces = fmt.pieces(example)
        prompt, labels, completion = pieces.context, pieces.context_labels, pieces.final
        room = max_length - len(completion)
        if len(prompt) > room:
            head = _leading_specials(tokenizer, prompt)
            where = _where(example, index, part)
            if room - head < min(MIN_PROMPT_TOKENS, len(prompt) - head):
                report.add_skipped(
                    f"{where}: its completion of {len(completion)} tokens leaves no room for the prompt "
                    f"within {max_length}"
                )
                continue
            report.add_truncated(f"{where}: prompt of {len(prompt)} tokens cut to {room}")
            tail = len(prompt) - (room - head)
            prompt, labels = prompt[:head] + prompt[tail:], labels[:head] + labels[tail:]
        kept.append(example)
        encoded.append(Pieces(prompt, labels, completion).encoded(fmt.seq2seq))
    report.kept = len(kept)
    return kept, encoded, report


def check_lost(report: FitReport, plan: LengthPlan) -> None:
    """Refuse a run that would lose more than :data:`MAX_LOST_FRACTION` of a split's rows."""
    if report.rows and report.too_long > MAX_LOST_FRACTION * report.rows:
        suggestion = plan.p95 if plan.context is None else min(plan.p95, plan.context)
        raise ValueError(
            f"{report.too_long:,} of {report.rows:,} {report.part} rows do not fit within max length "
            f"{plan.max_length} even with their prompts cut (more than {MAX_LOST_FRACTION:.0%}); "
            f"--seq-len {suggestion} would fit {COVERAGE:.0%} of them"
        )
