"""Continuous batching: the running batch changes at every decoding step.

:class:`RunningBatch` holds the rows being decoded, one transformers ``DynamicCache`` for all
of them and the attention mask over its columns. Each :meth:`RunningBatch.step`:

1. drops the rows whose client has gone;
2. prefills the newly admitted rows together (left padded, each through its own adapter),
   picks their first tokens and joins their cache rows to the running cache: both are written
   into one new cache, the narrower one's rows padded on the left with masked columns;
3. runs one decoding step of every row: its last token at its own position, the mask over
   the whole cache plus the new column, ``adapter_names`` with one entry per row (prefix rows
   get their own prefix at the attention seam, so the cache holds real tokens only);
4. lets the finished rows leave at once (``DynamicCache.batch_select_indices``) and cuts the
   cache columns no remaining row uses.

With ``max_prefill_tokens``, step 2 prefills at most that many prompt columns: a longer prompt
is prefilled in chunks, one per step, into its own cache (each chunk attends to the columns
before it), and joins the running batch after its last chunk (after that step's decoding), so
the running rows go on decoding meanwhile instead of waiting for the whole prompt.

The cache is :class:`~peftlab.serving.kv_cache.SpareCache`: a decoding step writes its new
column into room kept behind the rows instead of copying the whole cache.

Padding columns are masked and positions are counted per row, so a row's logits are its own
whatever else runs beside it (equal to decoding it alone within float rounding; greedy and
seeded outputs are the same).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from peftlab.core.peft_model import PeftModel
from peftlab.serving.decoding import StopRules, choose
from peftlab.serving.jobs import Row
from peftlab.serving.small_batch import MAX_ROWS, small_batch_linear


@dataclass
class StepReport:
    """What one step did: rows prefilled and their prompt tokens, the decoding batch, new tokens,
    and the rows that left the batch (finished or cancelled)."""

    prefilled: int = 0
    prefill_tokens: int = 0
    decoded: int = 0
    adapters: int = 0  # distinct adapters (the base counts as one) in the decoding batch
    new_tokens: int = 0
    left: list[Row] = field(default_factory=list)


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes its KV cache (``cache`` in recent
    transformers, ``past_key_values`` before), or a ValueError saying why it cannot run here."""
    params = inspect.signature(model.forward).parameters
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder: its rows run in "
            "peftlab.serving.encoder_decoder.EncoderDecoderBatch (or with batching='static')"
        )
    if "position_ids" not in params:
        raise ValueError(
            f"{type(model).__name__}.forward takes no position_ids, which continuous batching needs "
            "(each row has its own positions); use batching='static' (--batching static)"
        )
    for name in ("cache", "past_key_values"):
        if name in params:
            break
    else:
        raise ValueError(
            f"{type(model).__name__}.forward takes no KV cache; use batching='static' (--batching static)"
        )
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is not None:
        layers = DynamicCache(config=config).layers
        odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
        if odd:
            raise ValueError(
                f"{type(model).__name__}'s cache has {', '.join(odd)} layers (sliding windows or "
                "linear attention); continuous batching joins full-attention caches only: use "
                "batching='static' (--batching static)"
            )
    return name


@dataclass
class Prefill:
    """Rows admitted together whose prompts are being prefilled chunk by chunk (left padded to
    one width, positions counted per row) into their own cache, ``done`` columns so far."""

    rows: list[Row]
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any
    done: int = 0

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])


class RunningBatch:
    """The rows being decoded, their shared KV cache and mask (used by the model worker only)."""

    # whether a prompt can be prefilled in chunks across steps (an encoder reads it whole)
    chunked_prefill: ClassVar[bool] = True

    def __init__(
        self,
        model: PeftModel,
        rules: StopRules,
        pad: int,
        observer: Callable[[Sequence[Row], torch.Tensor], None] | None = None,
        max_prefill_tokens: int | None = None,
        small_batch_matmul: bool = False,
    ) -> None:
        """``observer(rows, logits)``, when given, sees every model call's next-token logits;
        ``max_prefill_tokens`` (None: no limit) caps the prompt columns prefilled per step;
        ``small_batch_matmul`` computes the linear layers of calls with few tokens as
        :mod:`peftlab.serving.small_batch` does."""
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens if self.chunked_prefill else None
        self.prefills: list[Prefill] = []  # admitted rows whose prompts are still being prefilled
        # rows wholly prefilled in this step, joining after its decoding: cache, mask, rows, kept
        self.ready: tuple[Any, torch.Tensor, list[Row], list[int]] | None = None
        self.model = model
        self.small_batch_matmul = small_batch_matmul
        self.observer = observer
        self.rules = rules
        self.pad = pad
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.rows: list[Row] = []
        self.cache: Any = None  # a DynamicCache with one row per running row
        self.mask: torch.Tensor | None = None  # (rows, cache width), 1 where a real token is
        self.lengths: list[int] = []  # real tokens of each row in the cache
        self.last: list[int] = []  # each row's newest token, its next input
        self._prepare(model.base_model)

    def _prepare(self, base: Any) -> None:
        """Check that ``base`` can run here and read how its forward is called."""
        self.cache_kwarg = cache_argument(base)
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    def step(self, admit: Sequence[Row] = ()) -> StepReport:
        """Admit ``admit`` (prefill and join), then decode one token of every running row."""
        report = StepReport()
        for row in self.rows:
            if row.job.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        report.left += self._leave()
        live = [r for r in admit if not r.job.cancelled]
        for row in admit:
            if row.job.cancelled:
                row.finish_reason = "cancelled"
                report.left.append(row)
        if self.max_prefill_tokens is None:
            if live:
                report.prefilled = len(live)
                report.prefill_tokens = sum(len(r.prompt_ids) for r in live)
                report.new_tokens += len(live)
                self._prefill(live)
                report.left += [r for r in live if r.finish_reason is not None]
        else:
            if live:
                self.prefills.append(self._start_prefill(live))
            self._prefill_chunk(report)
        if self.rows:
            report.decoded = len(self.rows)
            report.adapters = len({r.adapter for r in self.rows})
            report.new_tokens += len(self.rows)
            self._decode()
        report.left += self._leave()
        if self.ready is not None:
            # rows whose last chunk (of several) was prefilled in this step join after its
            # decoding, so that one step does not carry the last chunk, the join and the first
            # decoding over the wider cache all at once
            cache, mask, rows, keep = self.ready
            self.ready = None
            self._join_kept(cache, mask, rows, keep)
        return report

    @property
    def prefilling(self) -> list[Row]:
        """Admitted rows whose prompts are not wholly prefilled yet."""
        return [r for p in self.prefills for r in p.rows]

    def clear(self) -> list[Row]:
        """Drop every row (after a failed step), those being prefilled too; returns them."""
        rows = [*self.rows, *self.prefilling]
        if self.ready is not None:
            rows += [self.ready[2][i] for i in self.ready[3]]
        self.prefills, self.ready = [], None
        self._empty()
        return rows

    def _empty(self) -> None:
        """No running rows (rows being prefilled, or about to join, stay)."""
        self.rows, self.lengths, self.last = [], [], []
        self.cache = self.mask = None

    # ---- the model calls ------------------------------------------------------------------
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        rows: Sequence[Row],
        observe: bool = True,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_kwarg: cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = 1
        few = self.small_batch_matmul and ids.numel() <= MAX_ROWS
        with torch.no_grad(), small_batch_linear(few):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask,
                position_ids=positions.to(self.device),
                adapter_names=[r.adapter for r in rows],
                **kwargs,
            )
        logits = out.logits[:, -1].float()
        if self.observer is not None and observe:
            self.observer(rows, logits)
        return logits

    def _prefill(self, rows: list[Row]) -> None:
        from peftlab.serving.kv_cache import SpareCache

        ids, mask = self._prompts(rows, left=True)  # left padding: every row ends at the edge
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        mask = mask.to(self.device)
        cache = SpareCache()
        keep = self._first_tokens(rows, self._forward(ids, mask, positions, cache, rows))
        self._join_kept(cache, mask, rows, keep)

    def _start_prefill(self, rows: list[Row]) -> Prefill:
        from peftlab.serving.kv_cache import SpareCache

        ids, mask = self._prompts(rows, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return Prefill(rows, ids, mask.to(self.device), positions, SpareCache())

    def _prefill_chunk(self, report: StepReport) -> None:
        """Prefill the next at most ``max_prefill_tokens`` columns of the oldest admitted rows; at
        their last chunk they pick their first tokens and join the running batch."""
        assert self.max_prefill_tokens is not None
        while self.prefills:
            part = self.prefills[0]
            gone = [i for i, r in enumerate(part.rows) if r.job.cancelled]
            for i in gone:
                part.rows[i].finish_reason = "cancelled"
                report.left.append(part.rows[i])
            if len(gone) == len(part.rows):
                self.prefills.pop(0)
                continue
            if gone:
                keep = [i for i in range(len(part.rows)) if i not in gone]
                index = torch.tensor(keep, device=self.device)
                if part.done:
                    part.cache.batch_select_indices(index)
                part.rows = [part.rows[i] for i in keep]
                part.ids, part.positions = part.ids[keep], part.positions[keep]
                part.mask = part.mask[index]
            break
        else:
            return
        start, end = part.done, min(part.width, part.done + self.max_prefill_tokens)
        report.prefill_tokens = int(part.mask[:, start:end].sum())
        logits = self._forward(
            part.ids[:, start:end],
            part.mask[:, :end],
            part.positions[:, start:end],
            part.cache,
            part.rows,
            observe=end == part.width,
        )
        part.done = end
        if end < part.width:
            return
        self.prefills.pop(0)
        rows = part.rows
        report.prefilled = len(rows)
        report.new_tokens += len(rows)
        keep = self._first_tokens(rows, logits)
        report.left += [r for r in rows if r.finish_reason is not None]
        if start == 0:  # prefilled in one step: decoded in this one too
            self._join_kept(part.cache, part.mask, rows, keep)
        else:
            self.ready = (part.cache, part.mask, rows, keep)

    def _decode(self) -> None:
        assert self.mask is not None
        ids = torch.tensor(self.last, dtype=torch.long)[:, None]
        positions = torch.tensor(self.lengths, dtype=torch.long)[:, None]
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(ids, mask, positions, self.cache, self.rows)
        self.mask = mask
        self._next_tokens(logits)

    # ---- shared by every running batch ----------------------------------------------------
    def _prompts(self, rows: list[Row], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' prompt ids padded to one width, on the left or the right, and their mask."""
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            where = slice(width - n, width) if left else slice(0, n)
            ids[i, where] = torch.tensor(row.prompt_ids)
            mask[i, where] = 1
        return ids, mask

    def _first_tokens(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Pick prefilled rows' first tokens; returns the indices of those that go on."""
        now = time.perf_counter()
        for row, token in zip(rows, choose(rows, logits), strict=True):
            self.rules.advance(row, token, now)
        return [i for i, r in enumerate(rows) if r.finish_reason is None]

    def _next_tokens(self, logits: torch.Tensor) -> None:
        """Pick every running row's next token from a decoding step's logits."""
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(self.rows, choose(self.rows, logits), strict=True)):
            self.lengths[i] += 1
            self.last[i] = token
            self.rules.advance(row, token, now)

    # ---- the cache ------------------------------------------------------------------------
    def _join_kept(self, cache: Any, mask: torch.Tensor, rows: list[Row], keep: list[int]) -> None:
        """The prefilled ``rows`` still running after their first token (indices ``keep``) join
        the batch with their rows of ``cache`` and ``mask``."""
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        joining = [rows[i] for i in keep]
        self._join(
            cache, mask, joining, [len(r.prompt_ids) for r in joining], [r.tokens[-1] for r in joining]
        )

    def _join(
        self, cache: Any, mask: torch.Tensor, rows: list[Row], lengths: list[int], last: list[int]
    ) -> None:
        from peftlab.serving.kv_cache import joined

        cache, mask = _trimmed(cache, mask)
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            old, new = width - self.mask.shape[1], width - mask.shape[1]
            self.cache = joined(self.cache, cache)
            self.mask = torch.cat([F.pad(self.mask, (old, 0)), F.pad(mask, (new, 0))], dim=0)
        self.rows += rows
        self.lengths += lengths
        self.last += last

    def _leave(self) -> list[Row]:
        """Take finished rows out of the batch; returns them."""
        gone = [r for r in self.rows if r.finish_reason is not None]
        if not gone:
            return []
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        if not keep:
            self._empty()
            return gone
        self._select(torch.tensor(keep, device=self.device))
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        self.last = [self.last[i] for i in keep]
        return gone

    def _select(self, index: torch.Tensor) -> None:
        """Keep only the cache rows (and the per-row tensors) of ``index``."""
        assert self.mask is not None
        self.cache.batch_select_indices(index)
        self.cache, self.mask = _trimmed(self.cache, self.mask[index])


def _trimmed(cache: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The cache and mask without the leading columns that no row uses."""
    from peftlab.serving.kv_cache import trimmed

    unused = int((mask.sum(0) == 0).long().cumprod(0).sum())
    if unused == 0:
        return cache, mask
    return trimmed(cache, unused), mask[:, unused:]
