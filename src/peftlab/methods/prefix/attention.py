"""The seam prefix tuning enters through: transformers' attention interface.

For the duration of a :class:`~peftlab.PeftModel` call the adapted model's
``config._attn_implementation`` names a wrapper of its own ``sdpa`` or ``eager`` function
(:func:`installed`) that prepends each layer's prefix, taken from the current
:class:`~peftlab.methods.prefix.call.PrefixedCall`, to the keys and values handed to it, with
mask columns (and T5 relative-position-bias columns) to match. The KV cache holds real tokens
only; prefix keys are not rotated, as in HF PEFT.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from peftlab.methods.prefix.call import PrefixedCall, current_call
from peftlab.methods.prefix.sites import AttentionSite

_WRAPPED = ("sdpa", "eager")
_IMPL_PREFIX = "peftlab_prefix_"


# ---- masks and bias for the prefix columns ---------------------------------------------------
def _extend_mask(mask: torch.Tensor, prefix_len: int, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Prepend ``prefix_len`` key columns to a 4D bool or additive mask: all visible, or per
    sample where ``seen`` (batch, prefix_len) says so."""
    if seen is None:
        shape = (*mask.shape[:-1], prefix_len)
        visible = (
            torch.ones(shape, dtype=torch.bool, device=mask.device)
            if mask.dtype == torch.bool
            else torch.zeros(shape, dtype=mask.dtype, device=mask.device)
        )
        return torch.cat([visible, mask], dim=-1)
    batch = seen.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    cols = seen[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], prefix_len)
    if mask.dtype != torch.bool:
        hidden = torch.finfo(mask.dtype).min
        cols = torch.zeros(cols.shape, dtype=mask.dtype, device=mask.device).masked_fill(~cols, hidden)
    return torch.cat([cols.to(mask.device), mask], dim=-1)


def _routed_mask(
    impl: str, seen: torch.Tensor, q_len: int, kv_len: int, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The mask per-sample prefixes need where the model passed none: prefix columns per sample,
    then all real keys (or the causal triangle sdpa's ``is_causal`` would have applied)."""
    real = torch.ones(q_len, kv_len, dtype=torch.bool, device=seen.device)
    if causal:
        real = real.tril()
    mask = real[None, None]
    if impl == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype, device=seen.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return _extend_mask(mask, seen.shape[1], seen)


def _causal_with_prefix(q_len: int, kv_len: int, prefix_len: int, device: torch.device) -> torch.Tensor:
    """Bool mask (1, 1, q, prefix + kv): the prefix, then what sdpa's ``is_causal`` means for real
    keys (aligned top-left; transformers leaves a causal mask to sdpa only when the queries start
    at key 0: no cache, or an empty static cache whose unused tail this also hides)."""
    real = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
    visible = torch.ones(q_len, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([visible, real], dim=-1)[None, None]


def _sdpa_causal(impl: str, module: nn.Module, q_len: int, kwargs: dict[str, Any]) -> Any:
    """Whether sdpa would apply its own causal triangle to this call (False for eager)."""
    if impl != "sdpa" or q_len <= 1:
        return False
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    return causal


def _prefixed_mask(
    impl: str,
    module: nn.Module,
    call: PrefixedCall,
    query: torch.Tensor,
    kv_len: int,
    prefix: tuple[int, torch.Tensor | None],
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> torch.Tensor | None:
    """The mask for keys ``[prefix; real]``: the model's with prefix columns, or one made where
    the model left masking to sdpa (``prefix`` is its length and which columns each sample sees)."""
    prefix_len, seen = prefix
    q_len = query.shape[2]
    if attention_mask is not None:
        mask = attention_mask
        return call.memo(mask, (prefix_len, id(seen)), lambda: _extend_mask(mask, prefix_len, seen))
    if seen is not None:
        causal = bool(_sdpa_causal(impl, module, q_len, kwargs))
        return call.memo(
            None,
            ("routed", q_len, kv_len, id(seen), causal, query.dtype),
            lambda: _routed_mask(impl, seen, q_len, kv_len, causal, query.dtype),
        )
    if _sdpa_causal(impl, module, q_len, kwargs):
        # with the prefix in front, sdpa's is_causal would hide real keys from the queries
        return call.memo(
            None,
            (q_len, kv_len, prefix_len, query.device),
            lambda: _causal_with_prefix(q_len, kv_len, prefix_len, query.device),
        )
    return None


def _first_real_columns(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per row, the key column of its first real token, read from the last query's row of the
    model's 4D mask (the columns in front of it are padding: rows of a left-padded cache, joined
    at different steps); None where the model passed no mask."""
    if mask is None:
        return None
    last = mask[:, 0, -1, :]
    visible = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return (~visible).long().cumprod(-1).sum(-1)


def _prefix_bias(
    source: nn.Module | None,
    bias: torch.Tensor,
    q_len: int,
    kv_len: int,
    prefix_len: int,
    front: torch.Tensor | None,
) -> torch.Tensor:
    """Relative-position-bias columns for the prefix, placed just before each row's first real
    token (``front``: its key column, per row; none: column 0), as when the row runs alone."""
    shape = (bias.shape[0], bias.shape[1], bias.shape[2], prefix_len)
    if source is None:
        return torch.zeros(shape, dtype=bias.dtype, device=bias.device)
    past = kv_len - q_len

    def columns(padding: int) -> torch.Tensor:
        full = source.compute_bias(  # type: ignore[operator]
            q_len, prefix_len + kv_len, device=bias.device, past_seen_tokens=prefix_len + past - padding
        )
        return full[..., :prefix_len].to(bias.dtype)

    if front is None or not bool(front.any()):
        return columns(0).expand(shape)
    front = front.to(bias.device)
    batch = max(bias.shape[0], front.shape[0])
    out = bias.new_empty(batch, *shape[1:])
    for padding in torch.unique(front).tolist():
        out[front.expand(batch) == padding] = columns(int(padding))[0]
    return out


# ---- the wrapper -----------------------------------------------------------------------------
def _prefixed_call(
    impl: str,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> Any:
    inner = _inner_function(impl, module)
    call = current_call()
    prefix = call.prefix(module, key) if call is not None else None
    if call is None or prefix is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    pk, pv, seen = prefix
    prefix_len, q_len, kv_len = pk.shape[2], query.shape[2], key.shape[2]
    bias = kwargs.get("position_bias")
    if isinstance(bias, torch.Tensor):
        source, model_mask, own = call.bias_source(module), attention_mask, bias
        extra = call.memo(
            bias,
            ("bias", prefix_len, id(source), id(model_mask)),
            lambda: _prefix_bias(source, own, q_len, kv_len, prefix_len, _first_real_columns(model_mask)),
        )
        assert extra is not None
        bias = bias.expand(extra.shape[0], *bias.shape[1:])
        kwargs["position_bias"] = torch.cat([extra, bias], dim=-1)
    attention_mask = _prefixed_mask(
        impl, module, call, query, kv_len, (prefix_len, seen), attention_mask, kwargs
    )
    key = torch.cat([pk, key], dim=2)
    value = torch.cat([pv, value], dim=2)
    return inner(module, query, key, value, attention_mask, **kwargs)


_EAGER: dict[type, Callable[..., Any]] = {}


def _inner_function(impl: str, module: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl != "eager":
        return ALL_ATTENTION_FUNCTIONS[impl]  # type: ignore[no-any-return]
    cls = type(module)
    fn = _EAGER.get(cls)
    if fn is None:
        fn = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(
                f"{cls.__name__} has no eager_attention_forward to wrap; use attn_implementation='sdpa'"
            )
        _EAGER[cls] = fn
    return fn


def _make_wrapper(impl: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        return _prefixed_call(impl, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{_IMPL_PREFIX}{impl}"
    return attention


# ---- installation ----------------------------------------------------------------------------
_REGISTERED = False
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[int, list[Any]] = {}  # id(config) -> [config, original implementation, users]


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for impl in _WRAPPED:
        AttentionInterface.register(f"{_IMPL_PREFIX}{impl}", _make_wrapper(impl))
        # masks are built exactly as for the wrapped implementation
        AttentionMaskInterface.register(f"{_IMPL_PREFIX}{impl}", ALL_MASK_ATTENTION_FUNCTIONS[impl])
    _REGISTERED = True


def wrapped_impl(config: Any) -> str:
    """The implementation a config uses now (seen through our wrapper), checked to be wrappable."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    impl = impl.removeprefix(_IMPL_PREFIX)
    if impl not in _WRAPPED:
        raise ValueError(
            f"prefix tuning works with attn_implementation 'sdpa' or 'eager', this model uses {impl!r}; "
            "load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )
    return impl


def switched_configs(model: nn.Module, sites: list[AttentionSite]) -> list[Any]:
    """The configs a prefixed call points at the wrapper (the model's and the sites' own), after
    checking now, not at the first call, that every site can be entered through the seam."""
    for site in sites:
        if getattr(sys.modules[type(site.module).__module__], "ALL_ATTENTION_FUNCTIONS", None) is None:
            raise ValueError(
                f"{type(site.module).__name__} does not use transformers' attention interface, the seam "
                "prefix tuning enters through; this architecture is not supported"
            )
    configs: list[Any] = []
    candidates = [getattr(model, "config", None)] + [getattr(s.module, "config", None) for s in sites]
    for candidate in candidates:
        if candidate is not None and all(candidate is not c for c in configs):
            wrapped_impl(candidate)
            configs.append(candidate)
    return configs


@contextlib.contextmanager
def installed(configs: list[Any]) -> Iterator[None]:
    """Point each config at the prefix wrapper of its implementation while any call needs it."""
    _register()
    with _INSTALL_LOCK:
        for config in configs:
            entry = _INSTALLED.get(id(config))
            if entry is None:
                impl = wrapped_impl(config)
                _INSTALLED[id(config)] = [config, impl, 1]
                config._attn_implementation = f"{_IMPL_PREFIX}{impl}"
            else:
                entry[2] += 1
    try:
        yield
    finally:
        with _INSTALL_LOCK:
            for config in configs:
                entry = _INSTALLED[id(config)]
                entry[2] -= 1
                if entry[2] == 0:
                    config._attn_implementation = entry[1]
                    del _INSTALLED[id(config)]
