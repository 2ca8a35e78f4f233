"""The running batch's KV cache: transformers' ``DynamicCache`` with layers that grow in place.

A plain ``DynamicLayer`` concatenates each step's new column onto its keys and values, copying the
whole cache at every decoding step: with 9 rows over 1,000 columns on SmolLM2 that is ~0.4 GB of
copies per token. :class:`SpareLayer` keeps its keys and values as views of larger buffers and
writes new columns into the room behind them; only when the room runs out (or the layer was handed
tensors it does not own, after rows left or joined) are the buffers made anew, with room for
:func:`room` more columns. The cache is still a transformers ``Cache``: the model reads and updates
it through the same interface, and ``batch_select_indices`` and every other method work unchanged.

:func:`joined` builds the cache of two batches side by side (the narrower left padded with zero
columns, which the mask hides) by writing each into one new buffer, instead of padding and then
concatenating (two full copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

# spare columns made when a layer's buffers are (re)made: a quarter of its width, within these
MIN_ROOM, MAX_ROOM = 64, 256


def room(width: int) -> int:
    """Spare columns for a cache ``width`` columns wide."""
    return max(MIN_ROOM, min(MAX_ROOM, width // 4))


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare room instead of concatenating (see the module
    docstring). ``keys``/``values`` are always ``(batch, heads, columns, head_dim)`` views."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, columns: int | None = None) -> SpareLayer:
        """A layer whose buffers are ``keys``/``values`` (batch, heads, width, dim), of which the
        first ``columns`` (all by default) are in use."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        used = keys.shape[-2] if columns is None else columns
        layer._own(keys, values, used)
        return layer

    def _own(
        self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, used: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._buffers = (key_buffer, value_buffer)
        keys, values = key_buffer[:, :, :used], value_buffer[:, :, :used]
        self.keys, self.values = keys, values
        self._views = (keys, values)
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        old = keys.shape[-2] if keys is not None and keys.dim() == 4 else 0
        new = old + key_states.shape[-2]
        buffers, views = self._buffers, self._views
        owned = (
            buffers is not None
            and views is not None
            and views[0] is keys
            and views[1] is values
            and buffers[0].shape[:2] == key_states.shape[:2]
            and buffers[1].shape[:2] == value_states.shape[:2]
            and buffers[0].dtype == key_states.dtype
            and buffers[0].shape[2] >= new
        )
        if not owned:
            width = new + room(new)
            key_buffer = key_states.new_empty((*key_states.shape[:2], width, key_states.shape[3]))
            value_buffer = value_states.new_empty((*value_states.shape[:2], width, value_states.shape[3]))
            if old:
                assert keys is not None and values is not None
                key_buffer[:, :, :old] = keys
                value_buffer[:, :, :old] = values
            buffers = (key_buffer, value_buffer)
        assert buffers is not None
        buffers[0][:, :, old:new] = key_states
        buffers[1][:, :, old:new] = value_states
        return self._own(buffers[0], buffers[1], new)


class SpareCache(DynamicCache):
    """A ``DynamicCache`` of :class:`SpareLayer` (empty: one made per model layer on first use)."""

    def __init__(self, layers: Sequence[SpareLayer] | None = None) -> None:
        if layers:
            Cache.__init__(self, layers=list(layers))
        else:
            Cache.__init__(self, layer_class_to_replicate=SpareLayer)


def _states(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    states = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ValueError(f"a {type(layer).__name__} cache layer holds no keys and values to join")
        states.append((keys, values))
    return states


def joined(first: Cache, second: Cache) -> Cache:
    """``first``'s rows then ``second``'s in one cache as wide as the wider of the two; the narrower
    one's rows get zero columns on the left."""
    layers = []
    for (k1, v1), (k2, v2) in zip(_states(first), _states(second), strict=True):
        width = max(k1.shape[2], k2.shape[2])
        rows = k1.shape[0] + k2.shape[0]
        if k1.shape[1:2] != k2.shape[1:2] or k1.shape[3] != k2.shape[3]:
            raise ValueError(f"cannot join caches of shapes {tuple(k1.shape)} and {tuple(k2.shape)}")
        buffers = []
        for a, b in ((k1, k2), (v1, v2)):
            out = a.new_empty((rows, a.shape[1], width + room(width), a.shape[3]))
            for start, part in ((0, a), (a.shape[0], b)):
                end, pad = start + part.shape[0], width - part.shape[2]
                if pad:
                    out[start:end, :, :pad].zero_()
                out[start:end, :, pad:width] = part
            buffers.append(out)
        layers.append(SpareLayer.holding(buffers[0], buffers[1], width))
    return SpareCache(layers)


def trimmed(cache: Cache, unused: int) -> Cache:
    """``cache`` without its first ``unused`` columns (views: the next update makes new buffers)."""
    layers = [
        SpareLayer.holding(keys[:, :, unused:], values[:, :, unused:]) for keys, values in _states(cache)
    ]
    return SpareCache(layers)
