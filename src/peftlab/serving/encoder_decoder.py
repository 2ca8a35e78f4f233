"""Continuous batching for encoder-decoders (T5): rows join and leave at every decoding step.

:class:`EncoderDecoderBatch` is a :class:`~peftlab.serving.continuous.RunningBatch` whose rows
each keep

- their encoder output, computed once when the row is admitted, through the row's own adapter
  (adapters in the encoder act there: LoRA, IA³ and bottleneck units, an encoder prefix);
- their rows of one transformers ``EncoderDecoderCache``: the decoder's self-attention cache
  (the tokens decoded so far) and its cross-attention cache (keys and values of the encoder
  output, made at admission and read at every step).

Admission runs the encoder and the first decoder step (the decoder start token) of the new rows
together; the encoder input is right padded, so a row's tokens stand where they would alone.
Their cache rows join the running cache: self-attention columns are padded on the left (every
row's newest token at the edge), cross-attention columns, the encoder output and its mask on
the right, each padding column masked. Each step decodes one token of every row in one call with
``adapter_names`` (one per row; a prefix row's prefix stands just before its own first decoder
token, wherever the padding puts it); finished rows leave at once and columns no row uses are cut.

A row's decoder position is the number of tokens it has decoded, not the cache width, once rows
join at different steps. Relative positions (T5's position bias, which depends on the distance
between query and key only) need nothing more; learned absolute positions taken from a cache
length (BART's ``embed_positions``) are renumbered per row for each step by hooks on that
embedding (:class:`RowPositions`), which run after a prefix's own shift. Decoders that number
positions in another way are refused with a pointer to static batching.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.prefix.positions import PositionEmbedding, position_embeddings
from peftlab.serving.continuous import RunningBatch
from peftlab.serving.jobs import Row
from peftlab.serving.small_batch import MAX_ROWS, small_batch_linear

# modules that number decoder positions absolutely (learned or sinusoidal embeddings)
_ABSOLUTE_POSITIONS = frozenset({"embed_positions", "wpe", "position_embeddings"})


def is_encoder_decoder(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_start_id(model: Any) -> int:
    """The token every decoder output starts from (the generation config's, else the config's)."""
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        start = getattr(config, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    raise ValueError(f"{type(model).__name__} has no decoder_start_token_id, so its decoder cannot start")


def encoder_decoder_cache_argument(model: Any) -> str:
    """The name under which an encoder-decoder's forward takes its cache, or a ValueError saying
    why continuous batching cannot run it."""
    static = "use batching='static' (--batching static)"
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    missing = [
        p for p in ("encoder_outputs", "decoder_input_ids", "decoder_attention_mask") if p not in params
    ]
    if missing:
        raise ValueError(
            f"{name}.forward takes no {', '.join(missing)}, which continuous batching needs; {static}"
        )
    cache = next((n for n in ("cache", "past_key_values") if n in params), None)
    if cache is None:
        raise ValueError(f"{name}.forward takes no cache; {static}")
    decoder_positions(model)
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(
            f"{name}'s cache has {', '.join(odd)} layers; continuous batching joins full-attention "
            f"caches only: {static}"
        )
    return cache


def decoder_positions(model: Any) -> list[PositionEmbedding]:
    """The decoder's absolute position embeddings, which each step renumbers per row (none for
    relative positions), or a ValueError saying why continuous batching cannot run ``model``."""
    name = type(model).__name__
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
    absolute = sorted(
        n for n, _ in decoder.named_modules() if n and n.rsplit(".", 1)[-1] in _ABSOLUTE_POSITIONS
    )
    if not absolute:
        return []
    refusal = (
        f"{name}'s decoder numbers positions with {absolute[0]} in a way continuous batching cannot "
        "give each row (it runs relative positions, as T5's, and learned positions taken from a cache "
        "length, as BART's); use batching='static' (--batching static)"
    )
    try:
        found = position_embeddings(model, {"decoder"})
    except ValueError as error:
        raise ValueError(refusal) from error
    if len(found) != len(absolute) or any(entry.cache_arg is None for entry in found):
        raise ValueError(refusal)
    return found


@dataclass
class RowPositions:
    """Hooks that number each row's new decoder tokens from its own count of decoded tokens:
    the embedding's call is run again with its positions moved by each row's ``shift`` (its
    count minus the cache width; 0 or less), through the embedding's other hooks (a prefix's
    shift), and each row takes its own result."""

    entry: PositionEmbedding
    shift: torch.Tensor  # (rows,)
    _call: tuple[tuple[Any, ...], dict[str, Any]] | None = field(default=None, init=False)
    _inside: bool = field(default=False, init=False)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        module = self.entry.module
        handles = [
            module.register_forward_pre_hook(self.before, with_kwargs=True, prepend=True),
            module.register_forward_hook(self.after, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._inside:
            self._call = (args, dict(kwargs))  # as the model called it, before any other hook

    def after(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor | None:
        if self._inside or self._call is None:
            return None
        shift = self.shift.to(output.device)
        out = output.expand(shift.shape[0], *output.shape[1:])
        self._inside = True
        try:
            for value in torch.unique(shift).tolist():
                moved_args, moved_kwargs = self.entry.moved(*self._call, int(value))
                part = module(*moved_args, **moved_kwargs)
                out = torch.where((shift == value).view(-1, *([1] * (out.dim() - 1))), part, out)
        finally:
            self._inside, self._call = False, None
        return out


class EncoderDecoderBatch(RunningBatch):
    """The rows being decoded by an encoder-decoder: their encoder outputs, their shared
    ``EncoderDecoderCache`` and masks (used by the model worker only). ``lengths`` counts each
    row's decoder tokens in the cache; ``mask`` is the decoder self-attention mask."""

    # the encoder reads a prompt whole, once: max_prefill_tokens limits admission, not chunks
    chunked_prefill = False

    def _prepare(self, base: Any) -> None:
        self.cache_kwarg = encoder_decoder_cache_argument(base)
        self.positions = decoder_positions(base)
        self.start = decoder_start_id(base)
        self.encoder_mask: torch.Tensor | None = None  # (rows, source width)
        self.encoder: torch.Tensor | None = None  # (rows, source width, hidden): the encoder output

    def _empty(self) -> None:
        super()._empty()
        self.encoder_mask = self.encoder = None

    # ---- the model calls ------------------------------------------------------------------
    def _call(
        self, rows: list[Row], cache: Any, shift: torch.Tensor | None = None, **inputs: Any
    ) -> tuple[torch.Tensor, Any]:
        """Next-token logits of ``rows`` and the model's output; ``shift`` moves each row's
        decoder positions (absolute ones) from the cache width to its own count of tokens."""
        ids = [v for k, v in inputs.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor)]
        few = self.small_batch_matmul and bool(ids) and all(v.numel() <= MAX_ROWS for v in ids)
        with contextlib.ExitStack() as stack, torch.no_grad(), small_batch_linear(few):
            if shift is not None and bool(shift.any()):
                for entry in self.positions:
                    stack.enter_context(RowPositions(entry, shift).installed())
            out = self.model(
                **{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
                adapter_names=[r.adapter for r in rows],
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
        logits = out.logits[:, -1].float()
        if self.observer is not None:
            self.observer(rows, logits)
        return logits, out

    def _prefill(self, rows: list[Row]) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        ids, mask = self._prompts(rows, left=False)  # right padding: tokens where they stand alone
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = torch.full((len(rows), 1), self.start, dtype=torch.long)
        logits, out = self._call(rows, cache, input_ids=ids, attention_mask=mask, decoder_input_ids=start)
        encoder = out.encoder_last_hidden_state
        keep = self._first_tokens(rows, logits)
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask, encoder = mask[index], encoder[index]
        joining = [rows[i] for i in keep]
        self._join_rows(
            cache,
            torch.ones((len(joining), 1), dtype=torch.long, device=self.device),
            (mask, encoder),
            joining,
            [r.tokens[-1] for r in joining],
        )

    def _decode(self) -> None:
        """One token of every row, in one model call."""
        from transformers.modeling_outputs import BaseModelOutput

        assert self.mask is not None and self.encoder is not None
        assert self.encoder_mask is not None
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits, _ = self._call(
            self.rows,
            self.cache,
            torch.tensor(self.lengths, device=self.device) - self.mask.shape[1],
            attention_mask=self.encoder_mask,
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder),
            decoder_input_ids=torch.tensor(self.last, dtype=torch.long)[:, None],
            decoder_attention_mask=mask,
        )
        self.mask = mask
        self._next_tokens(logits)

    # ---- the caches -----------------------------------------------------------------------
    def _join_rows(
        self,
        cache: Any,
        mask: torch.Tensor,
        source: tuple[torch.Tensor, torch.Tensor],
        rows: list[Row],
        last: list[int],
    ) -> None:
        """Add prefilled rows (their cache, decoder mask, encoder mask and output)."""
        from transformers import DynamicCache, EncoderDecoderCache

        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            self.encoder_mask, self.encoder = source
        else:
            assert self.encoder_mask is not None and self.encoder is not None
            width = max(self.mask.shape[1], mask.shape[1])
            old, new = width - self.mask.shape[1], width - mask.shape[1]
            length = max(self.encoder_mask.shape[1], source[0].shape[1])
            old_src, new_src = length - self.encoder_mask.shape[1], length - source[0].shape[1]
            decoded = [
                (
                    torch.cat([_pad_columns(a.keys, old, 0), _pad_columns(b.keys, new, 0)], dim=0),
                    torch.cat([_pad_columns(a.values, old, 0), _pad_columns(b.values, new, 0)], dim=0),
                )
                for a, b in zip(
                    self.cache.self_attention_cache.layers, cache.self_attention_cache.layers, strict=True
                )
            ]
            read = [
                (
                    torch.cat([_pad_columns(a.keys, 0, old_src), _pad_columns(b.keys, 0, new_src)], dim=0),
                    torch.cat(
                        [_pad_columns(a.values, 0, old_src), _pad_columns(b.values, 0, new_src)], dim=0
                    ),
                )
                for a, b in zip(
                    self.cache.cross_attention_cache.layers, cache.cross_attention_cache.layers, strict=True
                )
            ]
            self.cache = EncoderDecoderCache(DynamicCache(decoded), DynamicCache(read))
            self.mask = torch.cat([F.pad(self.mask, (old, 0)), F.pad(mask, (new, 0))], dim=0)
            src_mask, encoder = source
            self.encoder_mask = torch.cat(
                [F.pad(self.encoder_mask, (0, old_src)), F.pad(src_mask, (0, new_src))]
            )
            self.encoder = torch.cat(
                [F.pad(self.encoder, (0, 0, 0, old_src)), F.pad(encoder, (0, 0, 0, new_src))], dim=0
            )
        self.rows += rows
        self.lengths += [1] * len(rows)  # the decoder start token
        self.last += last
        self._trim()

    def _select(self, index: torch.Tensor) -> None:
        assert self.mask is not None and self.encoder_mask is not None and self.encoder is not None
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.encoder_mask, self.encoder = self.encoder_mask[index], self.encoder[index]
        self._trim()

    def _trim(self) -> None:
        """Cut the decoder columns in front and the source columns behind that no row uses."""
        from transformers import DynamicCache, EncoderDecoderCache

        assert self.mask is not None and self.encoder_mask is not None and self.encoder is not None
        front = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        back = int((self.encoder_mask.sum(0) == 0).long().flip(0).cumprod(0).sum())
        if not front and not back:
            return
        length = self.encoder_mask.shape[1] - back
        decoded = [
            (x.keys[:, :, front:], x.values[:, :, front:]) for x in self.cache.self_attention_cache.layers
        ]
        read = [
            (x.keys[:, :, :length], x.values[:, :, :length]) for x in self.cache.cross_attention_cache.layers
        ]
        self.cache = EncoderDecoderCache(DynamicCache(decoded), DynamicCache(read))
        self.mask = self.mask[:, front:]
        self.encoder_mask = self.encoder_mask[:, :length]
        self.encoder = self.encoder[:, :length]


def _pad_columns(states: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(batch, heads, seq, dim) states with zero positions before and after."""
    return F.pad(states, (0, 0, before, after)) if before or after else states
