"""Where a prefix goes: the attention modules it enters and the slots of the prefix each reads.

Layout (HF PEFT's, so checkpoints mean the same in both): the vectors form one tensor
``(num_virtual_tokens, num_slots * num_kv_heads * head_dim)``; slots ``2i`` / ``2i+1`` are
layer ``i``'s keys / values. For ``SEQ_2_SEQ_LM`` PEFT puts the prefix on decoder
self-attention only, decoder layer ``i`` reading slots ``4i mod 2L`` and ``4i+1 mod 2L``.
``encoder_prefix`` / ``cross_prefix`` (names from AdapterHub) add separate prefixes to the
encoder's self-attention and the decoder's cross-attention, as in the paper; such an
adapter has more slots and HF PEFT cannot load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.methods.prefix.config import PrefixTuningConfig

# path components / flags that mark an attention module as cross-attention
_CROSS_NAMES = frozenset(
    {"encdecattention", "encoder_attn", "crossattention", "cross_attn", "cross_attention"}
)


@dataclass
class AttentionSite:
    """One attention module and the slots (indices into the prefix tensor) it reads."""

    module: nn.Module
    name: str
    stack: str  # "encoder" / "decoder" in encoder-decoder models, else ""
    cross: bool
    slots: tuple[int, int] | None = None
    bias_source: nn.Module | None = None  # T5-style relative position bias of its stack


def _first_attr(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) from the model config, derived as HF PEFT does
    (layers of the encoder for encoder-decoder models)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"prefix tuning needs a transformers model with a config; {type(model).__name__} has none"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = _first_attr(config, ("num_hidden_layers", "num_layers", "n_layer"))
    hidden = _first_attr(config, ("hidden_size", "n_embd", "d_model"))
    heads = _first_attr(config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    if layers is None or heads is None or (hidden is None and getattr(config, "d_kv", None) is None):
        raise ValueError(
            f"cannot read layer count, hidden size and head count from {type(config).__name__}; "
            "set num_layers, token_dim and num_attention_heads in PrefixTuningConfig"
        )
    kv_heads = _first_attr(config, ("num_key_value_heads",)) or heads
    head_dim = _first_attr(config, ("head_dim", "d_kv")) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The innermost ``*Attention`` modules, i.e. those that call the attention interface."""
    named = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    names = [n for n, _ in named]
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    sites = []
    for name, module in named:
        if any(other.startswith(name + ".") for other in names):
            continue  # a container (e.g. T5LayerSelfAttention) around the real attention module
        parts = name.split(".")
        cross = (
            getattr(module, "is_cross_attention", False) is True
            or "Cross" in type(module).__name__
            or any(p.lower() in _CROSS_NAMES for p in parts)
        )
        stack = next((p for p in parts if p in ("encoder", "decoder")), "") if encoder_decoder else ""
        sites.append(AttentionSite(module, name, stack, cross))
    return sites


def prefixed_stacks(sites: list[AttentionSite]) -> set[str]:
    """The stacks whose self-attention has a prefix: their real tokens are numbered after it."""
    return {site.stack for site in sites if not site.cross}


def assign_slots(sites: list[AttentionSite], config: PrefixTuningConfig, num_layers: int) -> int:
    """Give each adapted site its (key, value) slots; returns the number of slots."""
    groups = _group_by_stack(sites)
    if not any(s.stack for s in sites):  # decoder-only or encoder-only
        main = groups.get(("", False), [])
        _check_count(main, num_layers, "self-attention")
        return _number_in_order(main)

    encoder, decoder = groups.get(("encoder", False), []), groups.get(("decoder", False), [])
    cross = groups.get(("decoder", True), [])
    if not decoder:
        raise ValueError("prefix tuning found no decoder self-attention in this encoder-decoder model")
    if not (config.encoder_prefix or config.cross_prefix):
        # HF PEFT's layout: one prefix per encoder layer count, laid out for decoder self-attention
        _check_count(encoder, num_layers, "encoder self-attention")
        pair = config.num_transformer_submodules == 2
        for i, s in enumerate(decoder[:num_layers]):
            first = (4 * i) % (2 * num_layers) if pair else 2 * i
            s.slots = (first, first + 1)
        return 2 * num_layers
    chosen = decoder + (encoder if config.encoder_prefix else []) + (cross if config.cross_prefix else [])
    return _number_in_order(chosen)


def _group_by_stack(sites: list[AttentionSite]) -> dict[tuple[str, bool], list[AttentionSite]]:
    """Sites by (stack, cross); each group's sites share the relative position bias one of them owns."""
    groups: dict[tuple[str, bool], list[AttentionSite]] = {}
    for site in sites:
        groups.setdefault((site.stack, site.cross), []).append(site)
    for group in groups.values():
        source = next(
            (s.module for s in group if getattr(s.module, "has_relative_attention_bias", False)), None
        )
        for s in group:
            s.bias_source = source if callable(getattr(source, "compute_bias", None)) else None
    return groups


def _number_in_order(sites: list[AttentionSite]) -> int:
    """Slots ``2i`` / ``2i+1`` for the ``i``-th site; returns the number of slots."""
    for i, s in enumerate(sites):
        s.slots = (2 * i, 2 * i + 1)
    return 2 * len(sites)


def _check_count(group: list[AttentionSite], expected: int, what: str) -> None:
    if len(group) != expected:
        raise ValueError(
            f"prefix tuning found {len(group)} {what} modules but the config says {expected} layers; "
            "this architecture's attention modules were not recognised (peftlab looks for modules "
            "named *Attention that use transformers' attention interface)"
        )
