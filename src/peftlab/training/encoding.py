"""Rows as token ids, and batches of them: the encoding every command trains and evaluates on.

A prompt and its completion are tokenised separately, so the boundary between them is exact;
the completion ends with eos, and the prompt's labels are -100 (only the completion is
learned). For an encoder-decoder (T5, BART) a row is two sequences instead: the prompt is the
encoder's input and the completion + eos the decoder's targets, every one of them learned
(``Encoded.seq2seq``). :func:`collate` pads a batch, :class:`BatchStream` draws the batches of a run in a
seeded order whose state is part of a checkpoint. How over-long rows are cut, and chat
templates, are :mod:`peftlab.training.fitting`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.data.tasks import Example
from peftlab.training.lm_head import IGNORE_INDEX


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + completion; ``labels`` are the ids with the prompt set to -100.

    With ``seq2seq`` (an encoder-decoder's row) ``input_ids`` are the encoder's input (the prompt)
    and ``labels`` the decoder's targets (the completion + eos), aligned with the decoder's
    positions: no shift, and -100 only where nothing is learned."""

    input_ids: list[int]
    labels: list[int]
    # tokens before the final supervised span (a chat's last assistant turn, whose earlier
    # assistant turns are supervised too); None: before the first supervised token
    context_length: int | None = None
    seq2seq: bool = False

    @property
    def prompt_length(self) -> int:
        """Tokens before the supervised completion: the prompt (possibly cut to fit), or a chat's
        conversation up to its last assistant turn, which generation at evaluation continues
        (an encoder-decoder's whole encoder input)."""
        if self.seq2seq:
            return len(self.input_ids)
        if self.context_length is not None:
            return self.context_length
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.labels))

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]

    @property
    def num_tokens(self) -> int:
        """Tokens the model reads for this row (an encoder-decoder's: encoder and decoder)."""
        return len(self.input_ids) + (len(self.labels) if self.seq2seq else 0)


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's eos id: every completion ends with it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so completions can end")
    return int(eos)


def pad_id(tokenizer: Any, eos_ids: Iterable[int] = ()) -> int:
    """The id put in padded positions: the tokenizer's pad token, else its eos, else the smallest
    of ``eos_ids`` (e.g. a generation config's), else 0. Padding is masked out of attention and
    of the loss, so any id gives the same results; this one rule keeps every command's batches
    identical."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return min(eos_ids, default=0)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids exactly as training sees them (the tokenizer's own special tokens included)."""
    return list(tokenizer(prompt)["input_ids"])


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """Completion ids as training sees them: no special tokens of its own, eos appended."""
    return [*tokenizer(completion, add_special_tokens=False)["input_ids"], eos_id(tokenizer)]


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Prompt and completion tokenised separately, so the boundary is exact, then eos appended.
    A prompt that leaves no room is an error here; :func:`peftlab.training.fitting.fit_examples`
    cuts or skips such rows instead."""
    prompt = encode_prompt(tokenizer, example.prompt)
    completion = encode_completion(tokenizer, example.completion)
    if len(prompt) >= max_length:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room for the completion within "
            f"max_length={max_length}; raise max_length or shorten the prompt"
        )
    ids = (prompt + completion)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    return Encoded(ids, labels)


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_length: int = 256) -> list[Encoded]:
    return [encode_example(tokenizer, ex, max_length) for ex in examples]


def collate(
    batch: Sequence[Encoded], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads).
    Encoder-decoder rows pad their encoder input and their decoder targets each to its own
    longest (the targets always on the right, where the decoder's positions start)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    seq2seq = {ex.seq2seq for ex in batch}
    if len(seq2seq) > 1:
        raise ValueError("a batch mixes encoder-decoder rows with decoder-only ones; encode them alike")
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    label_width = max(len(ex.labels) for ex in batch) if True in seq2seq else width
    labels = torch.full((len(batch), label_width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(ex.input_ids)
        mask[i, cols] = 1
        if ex.seq2seq:
            labels[i, : len(ex.labels)] = torch.tensor(ex.labels, dtype=torch.long)
        else:
            labels[i, cols] = torch.tensor(ex.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def num_targets(example: Encoded) -> int:
    """How many tokens of ``example`` the loss scores (labels after the shift that are not -100;
    an encoder-decoder's targets are not shifted)."""
    scored = example.labels if example.seq2seq else example.labels[1:]
    return sum(1 for label in scored if label != IGNORE_INDEX)


class BatchStream:
    """Batch indices as consecutive chunks of a stream of fresh permutations of ``range(n)``.

    Its state (generator, the rest of the current permutation, samples drawn) is the data
    position of a run: restoring it continues the exact same order.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no training examples")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[int] = []
        self.samples_seen = 0

    @property
    def epoch(self) -> float:
        """Passes over the data so far (fractional)."""
        return self.samples_seen / self.n

    def take(self, count: int) -> list[int]:
        while len(self.pending) < count:
            self.pending += torch.randperm(self.n, generator=self.generator).tolist()
        out, self.pending = self.pending[:count], self.pending[count:]
        self.samples_seen += count
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "generator": self.generator.get_state(),
            "pending": list(self.pending),
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(
                f"the saved data position is for {state['n']} training examples but this run has {self.n}"
            )
        self.generator.set_state(state["generator"])
        self.pending = [int(i) for i in state["pending"]]
        self.samples_seen = int(state["samples_seen"])
