"""Each row's next token and its stop rules, the same for static and continuous batching.

A row's token depends on its own logits and its own generator only, never on the other rows
of its batch: greedy rows take the argmax, sampled rows (``temperature > 0``) draw from
softmax(logits / T), top-p filtered, with a generator seeded from the request's ``seed``.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from peftlab.serving.jobs import Row, StreamChunk

Emit = Callable[[Row, StreamChunk], None]


def draw(row: Row, scores: torch.Tensor) -> int:
    """A sampled row's next token from its 1-D ``scores`` and its own generator."""
    p = row.params
    if row.generator is None:
        row.generator = torch.Generator(device=scores.device)
        row.generator.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
    probs = torch.softmax(scores.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (the first always)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < p.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def choose(rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
    """The next token of every row from its ``logits`` (rows x vocab)."""
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.params.temperature > 0:
            tokens[i] = draw(row, logits[i])
    return tokens


class SampledAsGreedy:
    """Logits processor for ``generate``: a sampled row's scores become its drawn token alone,
    so greedy selection picks it; greedy rows pass through untouched."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for i, row in enumerate(self.rows):
            if row.params.temperature <= 0 or row.finish_reason is not None:
                continue
            token = draw(row, scores[i])
            if out is scores:
                out = scores.clone()
            out[i] = -math.inf
            out[i, token] = 0.0
        return out


class StopRules:
    """Records a row's new token and ends the row at an eos token, its ``max_tokens`` or one of
    its stop strings; with streaming, sends text as soon as it cannot change any more."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], emit: Emit) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.emit_chunk = emit
        self.lock = threading.Lock()  # fast tokenizers must not be used by two threads at once

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def advance(self, row: Row, token: int, now: float) -> None:
        if row.first_token_at is None:
            row.first_token_at = now
        if token in self.eos_ids:
            self.finish(row, "stop")
            return
        row.tokens.append(token)
        stop = row.params.stop
        streaming = row.job.events is not None
        if stop or streaming:
            text = self.decode(row.tokens)
            cut = min((p for p in (text.find(s) for s in stop) if p >= 0), default=-1)
            if cut >= 0:
                row.text = text[:cut]
                row.finish_reason = "stop"
                self._emit(row, row.text, "stop")
                return
            if len(row.tokens) >= row.params.max_tokens:
                self.finish(row, "length", text)
                return
            if streaming:
                # hold back what could still become a stop string, and half-decoded characters
                hold = max((len(s) for s in stop), default=1) - 1
                upto = len(text) - hold
                while upto > row.streamed and text[upto - 1] == "\ufffd":
                    upto -= 1
                self._emit(row, text[:upto], None)
            return
        if len(row.tokens) >= row.params.max_tokens:
            self.finish(row, "length")

    def finish(self, row: Row, reason: str, text: str | None = None) -> None:
        row.text = self.decode(row.tokens) if text is None else text
        row.finish_reason = reason
        self._emit(row, row.text, reason)

    def _emit(self, row: Row, text: str, reason: str | None) -> None:
        if row.job.events is None:
            return
        delta = text[row.streamed :]
        if not delta and reason is None:
            return
        row.streamed = max(row.streamed, len(text))
        self.emit_chunk(row, StreamChunk(row.index, delta, reason))


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a row: the tokenizer's eos and the generation config's."""
    ids: set[int] = set()
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    config = getattr(model, "generation_config", None)
    gen_eos = getattr(config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(e) for e in gen_eos)
    return ids
