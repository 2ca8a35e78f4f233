"""Where real tokens stand after the prefix.

Positions follow HF PEFT, which hands the prefix to the model as a KV cache of
``num_virtual_tokens`` entries, so that the same checkpoint gives the same outputs in both:

- learned absolute positions (GPT-2, BART, BERT): real tokens are numbered from
  ``num_virtual_tokens`` on, as PEFT's cache makes the model do. A hook on the position
  embedding (``wpe``, ``embed_positions``, ``position_embeddings``) adds the prefix length for
  the span of the call, per sample with per-sample prefixes (:func:`shifted_positions`);
- rotary positions (llama, mistral, qwen2): real tokens keep their positions from 0 and the
  checkpoint is converted at the boundary instead, which is exact for rotary models (see
  ``PrefixEncoder.peft_vectors``; :func:`rotary_of` finds what it rotates with);
- T5's relative position bias gets columns for the prefix as if it stood just before the first
  token, which is what HF PEFT computes (in the attention seam).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.methods.prefix.call import current_call
from peftlab.methods.prefix.sites import AttentionSite

_POSITION_EMBEDDINGS = frozenset({"wpe", "embed_positions", "position_embeddings"})
_CACHE_LENGTH_ARGS = ("cache_length", "past_key_values_length")

# a model's rotary embedding module and the apply function of its attention modules
Rotary = tuple[nn.Module, Callable[..., Any]]


def rotary_of(model: nn.Module, sites: list[AttentionSite], head_dim: int) -> Rotary | None:
    """The model's one full-width rotary embedding and its apply function, if it has them."""
    rotaries = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "rotary_emb"]
    if len(rotaries) != 1 or not sites:
        return None
    inv_freq = getattr(rotaries[0], "inv_freq", None)
    apply_rotary = getattr(sys.modules[type(sites[0].module).__module__], "apply_rotary_pos_emb", None)
    if not isinstance(inv_freq, torch.Tensor) or 2 * inv_freq.numel() != head_dim or apply_rotary is None:
        return None
    return rotaries[0], apply_rotary


@dataclass
class PositionEmbedding:
    """A learned absolute position embedding and how its forward takes positions: ``plain``
    (``nn.Embedding``: the position ids are its input) or through a cache length (BART's
    ``embed_positions(input_ids, cache_length, position_ids=None)``, with an ``offset``)."""

    module: nn.Module
    name: str
    stack: str
    cache_arg: str | None  # None: plain
    parent: nn.Module  # the module that calls it: its input gives the batch size

    @property
    def size(self) -> int:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0]) - int(getattr(self.module, "offset", 0))

    def check(self, top: int) -> None:
        """Refuse a shift that numbers a real token past the last position the embedding has."""
        if top >= self.size:
            raise ValueError(
                f"the prefix moves real tokens to position {top}, but {self.name} has only {self.size} "
                "positions; shorten the input or use fewer num_virtual_tokens"
            )

    def moved(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], amount: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of a call to a cache-length embedding (BART's) with its positions moved
        by ``amount``, checked to stay within the embedding."""
        assert self.cache_arg is not None
        kwargs = dict(kwargs)
        given = kwargs.get("position_ids")
        if isinstance(given, torch.Tensor):
            kwargs["position_ids"] = given + amount
            self.check(int(kwargs["position_ids"].max()))
            return args, kwargs
        if len(args) > 1:
            args = (args[0], int(args[1]) + amount, *args[2:])
        else:
            kwargs[self.cache_arg] = int(kwargs.get(self.cache_arg, 0)) + amount
        seq = args[0].shape[1] if isinstance(args[0], torch.Tensor) and args[0].dim() > 1 else 0
        self.check((int(args[1]) if len(args) > 1 else int(kwargs[self.cache_arg])) + seq - 1)
        return args, kwargs


def position_embeddings(model: nn.Module, stacks: set[str]) -> list[PositionEmbedding]:
    """The learned absolute position embeddings of the stacks whose self-attention has a prefix."""
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] not in _POSITION_EMBEDDINGS or not isinstance(module, nn.Embedding):
            continue
        stack = next((p for p in parts if p in ("encoder", "decoder")), "") if encoder_decoder else ""
        if stack not in stacks:
            continue
        parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
        found.append(PositionEmbedding(module, name, stack, _cache_arg(name, module), parent))
    return found


def _cache_arg(name: str, module: nn.Embedding) -> str | None:
    """The argument through which ``module``'s forward takes a cache length; None for a plain embedding."""
    if type(module).forward is nn.Embedding.forward:
        return None
    params = inspect.signature(type(module).forward).parameters
    cache_arg = next((a for a in _CACHE_LENGTH_ARGS if a in params), None)
    if cache_arg is None:
        raise ValueError(
            f"prefix tuning: the position embedding {name} ({type(module).__name__}) takes positions "
            "in a way peftlab does not know, so real tokens could not be numbered after the prefix "
            "as HF PEFT does; this architecture is not supported"
        )
    return cache_arg


@contextlib.contextmanager
def shifted_positions(
    positions: list[PositionEmbedding], shift: Callable[[str], torch.Tensor | int]
) -> Iterator[None]:
    """Number real tokens after the prefix for the span of the block: ``shift(stack)`` is one
    length for every sample, or a tensor of one length per routing group (the current call's
    ``routing``)."""
    handles: list[Any] = []
    batches: dict[int, int] = {}  # id(parent) -> batch size of its current call
    for entry in positions:
        amount = shift(entry.stack)
        if isinstance(amount, int) and amount == 0:
            continue
        hooks = _ShiftHooks(entry, amount, batches)
        if not isinstance(amount, int):
            handles.append(entry.parent.register_forward_pre_hook(hooks.remember, with_kwargs=True))
        handles.append(entry.module.register_forward_pre_hook(hooks.before, with_kwargs=True))
        # first of the embedding's output hooks: one that renumbers rows (serving's per-row
        # decoder positions) runs the call again through these hooks and takes its rows from that
        handles.append(entry.module.register_forward_hook(hooks.after, with_kwargs=True, prepend=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _ShiftHooks:
    """The hooks that move one position embedding's positions by ``amount``."""

    entry: PositionEmbedding
    amount: torch.Tensor | int
    batches: dict[int, int]

    def remember(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """On the parent: note the batch size (a position embedding may see one row for all)."""
        batch = _batch_of(args, kwargs)
        if batch is not None:
            self.batches[id(module)] = batch

    def before(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        entry, amount = self.entry, self.amount
        if entry.cache_arg is None:  # nn.Embedding: the positions are its input
            ids = args[0]
            if isinstance(amount, int):
                moved = ids + amount
            else:
                batch = self.batches.get(id(entry.parent), ids.shape[0])
                moved = ids + _per_row(amount, batch, ids.device).view(-1, *([1] * (ids.dim() - 1)))
            entry.check(int(moved.max()))
            return (moved, *args[1:]), kwargs
        if not isinstance(amount, int):
            return None  # per sample: after() computes each shift's rows
        return entry.moved(args, kwargs, amount)

    def after(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor | None:
        entry, amount = self.entry, self.amount
        if entry.cache_arg is None or isinstance(amount, int):
            return None
        # the output may be one row for the whole batch (positions given as a 1D range)
        batch = max(output.shape[0], self.batches.get(id(entry.parent), output.shape[0]))
        rows = _per_row(amount, batch, output.device)
        out = output.expand(batch, *output.shape[1:])
        for value in torch.unique(rows).tolist():
            moved_args, moved_kwargs = entry.moved(args, kwargs, int(value))
            part = type(module).forward(module, *moved_args, **moved_kwargs)
            out = torch.where((rows == value).view(-1, *([1] * (out.dim() - 1))), part, out)
        return out


def _per_row(amount: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """One length per routing group -> one per sample of the current call."""
    call = current_call()
    assert call is not None and call.routing is not None
    return amount.to(device)[call.routing.sample_index(batch, device)]


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return None
