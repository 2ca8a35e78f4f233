"""The prefixes in force for one forward call, which the attention wrapper reads while it runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from peftlab.core.layers import Routing
from peftlab.methods.prefix.sites import AttentionSite

# an attention site, its adapter's prefix table (num_slots, kv_heads, P, head_dim) and the
# (key, value) slots the site reads from it
PrefixEntry = tuple[AttentionSite, torch.Tensor, tuple[int, int]]


class PrefixedCall:
    """The prefixes in force for one call: per attention module, the (table, slots) pairs of
    every active prefix adapter, plus small caches valid only for this call."""

    def __init__(self, parent: PrefixedCall | None, routing: Routing | None = None) -> None:
        self.entries: dict[nn.Module, list[PrefixEntry]] = {}
        if parent is not None:
            self.entries = {m: list(v) for m, v in parent.entries.items()}
        # per-sample prefixes: per module, keys and values (G, heads, P, dim) right-aligned
        # (a shorter prefix sits next to the real tokens) and which of the P columns are real
        self.routing = routing
        self.routed: dict[nn.Module, tuple[AttentionSite, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._kv: dict[
            tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
        ] = {}
        self._masks: list[tuple[Any, Any, torch.Tensor | None]] = []

    def add(self, site: AttentionSite, table: torch.Tensor, slots: tuple[int, int]) -> None:
        self.entries.setdefault(site.module, []).append((site, table, slots))

    def prefix(
        self, module: nn.Module, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Batch-expanded prefix keys and values for ``module`` in ``key``'s dtype, and with
        per-sample prefixes which prefix columns each sample sees (batch, P); or None."""
        batch = key.shape[0]
        cache_key = (id(module), batch, key.dtype)
        cached = self._kv.get(cache_key)
        if cached is not None:
            return cached
        result: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
        if module in self.routed:
            result = self._routed_prefix(module, key)
        else:
            found = self.entries.get(module)
            if found is None:
                return None
            result = self._shared_prefix(found, key)
        self._kv[cache_key] = result
        return result

    def _routed_prefix(
        self, module: nn.Module, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sample's own prefix, gathered by the routing."""
        assert self.routing is not None
        site, keys_t, values_t, visible = self.routed[module]
        _check_heads(site, keys_t, key)
        index = self.routing.sample_index(key.shape[0], key.device)
        return keys_t[index].to(key.dtype), values_t[index].to(key.dtype), visible[index]

    @staticmethod
    def _shared_prefix(
        found: list[PrefixEntry], key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The active adapters' prefixes, concatenated, for every sample."""
        keys, values = [], []
        for site, table, (k, v) in found:
            _check_heads(site, table, key)
            keys.append(table[k].to(key.dtype))
            values.append(table[v].to(key.dtype))
        batch = key.shape[0]
        pk = torch.cat(keys, dim=1).unsqueeze(0).expand(batch, -1, -1, -1)
        pv = torch.cat(values, dim=1).unsqueeze(0).expand(batch, -1, -1, -1)
        return pk, pv, None

    def add_routed(self, module: nn.Module, per_group: list[list[PrefixEntry]]) -> None:
        """Per-sample prefixes of ``module``: ``per_group[g]`` lists group g's (site, table, slots)."""
        site = next(e[0] for group in per_group for e in group)
        ref = next(e[1] for group in per_group for e in group)
        heads, dim = ref.shape[1], ref.shape[3]
        keys, values, lengths = [], [], []
        for group in per_group:
            k_parts = [table[k] for _, table, (k, _v) in group]
            v_parts = [table[v] for _, table, (_k, v) in group]
            keys.append(torch.cat(k_parts, dim=1) if k_parts else ref.new_zeros(heads, 0, dim))
            values.append(torch.cat(v_parts, dim=1) if v_parts else ref.new_zeros(heads, 0, dim))
            lengths.append(keys[-1].shape[1])
        width = max(lengths)
        pad = [(0, 0, width - n, 0) for n in lengths]  # in front: the prefix ends at the first token
        keys_t = torch.stack([torch.nn.functional.pad(k, p) for k, p in zip(keys, pad, strict=True)])
        values_t = torch.stack([torch.nn.functional.pad(v, p) for v, p in zip(values, pad, strict=True)])
        columns = torch.arange(width, device=ref.device)
        visible = columns[None, :] >= (width - torch.tensor(lengths, device=ref.device))[:, None]
        self.routed[module] = (site, keys_t, values_t, visible)

    def memo(self, obj: Any, extra: Any, make: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """``make()`` once per (object identity, extra); holds the object so its id stays unique."""
        for cached_obj, cached_extra, result in self._masks:
            if cached_obj is obj and cached_extra == extra:
                return result
        result = make()
        self._masks.insert(0, (obj, extra, result))
        del self._masks[6:]
        return result

    def bias_source(self, module: nn.Module) -> nn.Module | None:
        if module in self.routed:
            return self.routed[module][0].bias_source
        return self.entries[module][0][0].bias_source


def _check_heads(site: AttentionSite, table: torch.Tensor, key: torch.Tensor) -> None:
    """The prefix table (.., heads, P, head_dim) must fit the model's keys (b, heads, kv, head_dim)."""
    heads, head_dim = table.shape[1], table.shape[-1]
    if heads != key.shape[1] or head_dim != key.shape[3]:
        raise ValueError(
            f"prefix for {site.name} has {heads} heads x {head_dim} dims but the "
            f"model's keys have {key.shape[1]} x {key.shape[3]}; set token_dim / num_attention_heads "
            "to the model's num_key_value_heads * head_dim / num_key_value_heads"
        )


_CURRENT: ContextVar[PrefixedCall | None] = ContextVar("peftlab_prefix_run", default=None)


def current_call() -> PrefixedCall | None:
    """The prefixed call running in this context, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def in_force(call: PrefixedCall) -> Iterator[None]:
    """Make ``call`` the current one for the span of the block."""
    token = _CURRENT.set(call)
    try:
        yield
    finally:
        _CURRENT.reset(token)
