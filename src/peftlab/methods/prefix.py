"""Prefix tuning: learned key/value vectors in front of every attention layer
(Li & Liang, 2021, arXiv:2101.00190).

Each adapted attention layer attends over ``num_virtual_tokens`` learned keys ``P_k`` and
values ``P_v`` before the real ones:

    Attention(Q, K, V) = softmax(Q [P_k; K]^T * scale + [0; M]) [P_v; V]

The prefix is visible to every real token (its mask columns are 0 / True) while padding
and causality among real tokens are kept (``M``). Per layer ``P_k`` and ``P_v`` have the
model's key/value shape, ``num_key_value_heads x head_dim`` (grouped-query attention).
With ``prefix_projection`` they are produced by ``Linear -> tanh -> Linear`` from a small
embedding; :meth:`PrefixEncoder.fold_projection` replaces that MLP by the vectors it yields.

The prefix enters through one seam, transformers' attention interface: for the duration of
a :class:`~peftlab.PeftModel` call the adapted model's ``config._attn_implementation`` names
a wrapper of its own ``sdpa`` or ``eager`` function that prepends each layer's prefix to
the keys and values handed to it. The KV cache holds real tokens only; prefix keys are not
rotated, as in HF PEFT.

Positions follow HF PEFT, which hands the prefix to the model as a KV cache of
``num_virtual_tokens`` entries, so that the same checkpoint gives the same outputs in both:

- learned absolute positions (GPT-2, BART, BERT): real tokens are numbered from
  ``num_virtual_tokens`` on, as PEFT's cache makes the model do. A hook on the position
  embedding (``wpe``, ``embed_positions``, ``position_embeddings``) adds the prefix length for
  the span of the call, per sample with per-sample prefixes;
- rotary positions (llama, mistral, qwen2): real tokens keep their positions from 0 and the
  checkpoint is converted at the boundary instead, which is exact for rotary models (see
  :meth:`PrefixEncoder.peft_vectors`);
- T5's relative position bias gets columns for the prefix as if it stood just before the first
  token, which is what HF PEFT computes.

Layout (HF PEFT's, so checkpoints mean the same in both): the vectors form one tensor
``(num_virtual_tokens, num_slots * num_kv_heads * head_dim)``; slots ``2i`` / ``2i+1`` are
layer ``i``'s keys / values. For ``SEQ_2_SEQ_LM`` PEFT puts the prefix on decoder
self-attention only, decoder layer ``i`` reading slots ``4i mod 2L`` and ``4i+1 mod 2L``.
``encoder_prefix`` / ``cross_prefix`` (names from AdapterHub) add separate prefixes to the
encoder's self-attention and the decoder's cross-attention, as in the paper; such an
adapter has more slots and HF PEFT cannot load it.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import combination
from peftlab.core.combination import Inputs, Values
from peftlab.core.config import PeftConfig, TaskType, check_positive_int
from peftlab.core.host import AdapterHost
from peftlab.core.layers import Routing
from peftlab.core.method import Method

_WRAPPED = ("sdpa", "eager")
_IMPL_PREFIX = "peftlab_prefix_"
# path components / flags that mark an attention module as cross-attention
_CROSS_NAMES = frozenset(
    {"encdecattention", "encoder_attn", "crossattention", "cross_attn", "cross_attention"}
)


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Configuration of a prefix-tuning adapter; field names and meanings follow HF PEFT.

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules``
    are derived from the model when the adapter is created (as PEFT does) and written to the
    saved config; set by hand they must agree with the model.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    task_type: TaskType | str | None = None
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    encoder_prefix: bool = False
    cross_prefix: bool = False
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if self.task_type is None:
            raise ValueError(
                "task_type: prefix tuning needs one (CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS or "
                "FEATURE_EXTRACTION) to lay out its prefix"
            )
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("prefix_projection", "encoder_prefix", "cross_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        for name in ("encoder_hidden_size", "token_dim", "num_layers", "num_attention_heads"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules: must be 1, 2 or None (derived from task_type), "
                f"got {self.num_transformer_submodules!r}"
            )
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights: must be None (random) or 'zero', got {self.init_weights!r}")
        if (self.encoder_prefix or self.cross_prefix) and self.task_type != TaskType.SEQ_2_SEQ_LM:
            raise ValueError(
                "encoder_prefix / cross_prefix apply to encoder-decoder models: set task_type='SEQ_2_SEQ_LM' "
                "or leave them False"
            )
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save: must be a list of module names, got {self.modules_to_save!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # peftlab-only layout switches are written only when on, so PEFT reads the usual config as is
        for name in ("encoder_prefix", "cross_prefix"):
            if not out[name]:
                del out[name]
        return out


# ---- where the prefix goes ----------------------------------------------------------------
@dataclass
class _Site:
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


def _attention_sites(model: nn.Module) -> list[_Site]:
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
        sites.append(_Site(module, name, stack, cross))
    return sites


def _assign_slots(sites: list[_Site], config: PrefixTuningConfig, num_layers: int) -> int:
    """Give each adapted site its (key, value) slots; returns the number of slots."""
    groups: dict[tuple[str, bool], list[_Site]] = {}
    for site in sites:
        groups.setdefault((site.stack, site.cross), []).append(site)
    for group in groups.values():
        source = next(
            (s.module for s in group if getattr(s.module, "has_relative_attention_bias", False)), None
        )
        for s in group:
            s.bias_source = source if callable(getattr(source, "compute_bias", None)) else None

    if not any(s.stack for s in sites):  # decoder-only or encoder-only
        main = groups.get(("", False), [])
        _check_count(main, num_layers, "self-attention")
        for i, s in enumerate(main):
            s.slots = (2 * i, 2 * i + 1)
        return 2 * num_layers

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
    for i, s in enumerate(chosen):
        s.slots = (2 * i, 2 * i + 1)
    return 2 * len(chosen)


def _check_count(group: list[_Site], expected: int, what: str) -> None:
    if len(group) != expected:
        raise ValueError(
            f"prefix tuning found {len(group)} {what} modules but the config says {expected} layers; "
            "this architecture's attention modules were not recognised (peftlab looks for modules "
            "named *Attention that use transformers' attention interface)"
        )


# ---- the learned prefix ----------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """Holds one adapter's prefix and applies it to a model for the span of one call.

    Parameters (names as in HF PEFT): ``embedding.weight`` of shape
    ``(num_virtual_tokens, num_slots * num_kv_heads * head_dim)``; with projection
    ``embedding.weight`` ``(num_virtual_tokens, token_dim)`` and ``transform`` (MLP).
    """

    # the parameters are read here, not in forward(): FSDP2 all-gathers around these calls
    fsdp_forward_methods = ("key_values",)

    def __init__(
        self,
        config: PrefixTuningConfig,
        sites: list[_Site],
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        configs: list[Any],
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_slots, self.kv_heads, self.head_dim = num_slots, kv_heads, head_dim
        # plain lists, not submodules: the model's modules are not part of the adapter
        self._sites = [s for s in sites if s.slots is not None]
        self._configs = configs
        self._rope: tuple[nn.Module, Callable[..., Any]] | None = None
        # learned absolute positions to number after the prefix (stacks with a self-attention prefix)
        self._positions: list[_Positions] = []
        width = num_slots * kv_heads * head_dim
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            token_dim = kv_heads * head_dim
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(self.num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw)
            )
            if config.init_weights == "zero":
                last = self.transform[2]
                assert isinstance(last, nn.Linear)
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, width, **kw)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def prefix_projection(self) -> bool:
        return self.transform is not None

    def site_names(self) -> list[str]:
        """The attention modules this prefix enters."""
        return [site.name for site in self._sites]

    @property
    def shifted_stacks(self) -> set[str]:
        """The stacks whose real tokens this prefix numbers after itself (self-attention prefixes)."""
        return {site.stack for site in self._sites if not site.cross}

    def prefix_vectors(self) -> torch.Tensor:
        """The plain prefix, ``(num_virtual_tokens, num_slots * kv_heads * head_dim)``: HF PEFT's
        ``prompt_embeddings``."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def key_values(self) -> torch.Tensor:
        """The prefix as ``(num_slots, kv_heads, num_virtual_tokens, head_dim)``."""
        vectors = self.prefix_vectors()
        return vectors.view(self.num_virtual_tokens, self.num_slots, self.kv_heads, self.head_dim).permute(
            1, 2, 0, 3
        )

    @torch.no_grad()
    def fold_projection(self) -> None:
        """Replace the projection MLP by the prefix vectors it produces (nothing changes in the
        outputs; what remains trainable is the plain prefix). A no-op without projection."""
        if self.transform is None:
            return
        vectors = self.prefix_vectors().detach().clone()
        trainable = self.embedding.weight.requires_grad
        self.transform = None
        self.embedding = nn.Embedding.from_pretrained(vectors, freeze=not trainable)

    def load_prefix_vectors(self, vectors: torch.Tensor) -> None:
        """Set the plain prefix (folding a projection first, as PEFT does on load)."""
        expected = (self.num_virtual_tokens, self.num_slots * self.kv_heads * self.head_dim)
        if tuple(vectors.shape) != expected:
            raise ValueError(
                f"prompt_embeddings has shape {tuple(vectors.shape)} but this model's prefix needs "
                f"{expected} (num_virtual_tokens, layers * 2 * num_key_value_heads * head_dim); it was made "
                "for another model or another num_virtual_tokens / encoder_prefix / cross_prefix"
            )
        self.fold_projection()
        with torch.no_grad():
            self.embedding.weight.copy_(vectors.to(self.embedding.weight))

    def peft_vectors(self) -> torch.Tensor:
        """The prefix as HF PEFT stores and applies it (``prompt_embeddings``).

        PEFT numbers real tokens from ``num_virtual_tokens`` on, peftlab from 0. On rotary
        models that only changes query-prefix scores, ``(R_{t+P} q).p = (R_t q).(R_{-P} p)``,
        so keys are exchanged rotated by ``P`` positions and both libraries compute the same.
        (With learned absolute positions, e.g. GPT-2 and BART, peftlab numbers real tokens from P
        as PEFT does, so the vectors are exchanged as they are.)
        """
        return self._rotate_keys(self.prefix_vectors().detach(), self.num_virtual_tokens)

    def load_peft_vectors(self, vectors: torch.Tensor) -> None:
        """Inverse of :meth:`peft_vectors`."""
        self.load_prefix_vectors(self._rotate_keys(vectors, -self.num_virtual_tokens))

    def _rotate_keys(self, vectors: torch.Tensor, positions: int) -> torch.Tensor:
        if self._rope is None:
            return vectors
        rotary, apply_rotary = self._rope
        shape = (self.num_virtual_tokens, self.num_slots, self.kv_heads, self.head_dim)
        if tuple(vectors.shape) != (shape[0], shape[1] * shape[2] * shape[3]):
            return vectors  # load_prefix_vectors reports the mismatch
        table = vectors.detach().reshape(shape).clone()
        key_slots = sorted({s.slots[0] for s in self._sites if s.slots is not None})
        inv_freq = rotary.inv_freq
        assert isinstance(inv_freq, torch.Tensor)
        keys = table[:, key_slots].to(device=inv_freq.device, dtype=torch.float32)
        position = torch.full((1, 1), positions, dtype=torch.long, device=keys.device)
        cos, sin = rotary(keys, position)
        _, rotated = apply_rotary(keys, keys, cos, sin)
        table[:, key_slots] = rotated.to(table)
        return table.reshape(vectors.shape)

    @contextlib.contextmanager
    def scope(self, model: nn.Module) -> Iterator[None]:
        """Apply this prefix to every call of ``model`` inside the block (PeftModel's seam for
        model-level adapters); nested scopes of several adapters concatenate their prefixes."""
        _refuse_checkpointing(model)
        table = self.key_values()
        run = _Run(_RUN.get())
        for site in self._sites:
            assert site.slots is not None
            run.add(site, table, site.slots)
        token = _RUN.set(run)
        stacks = self.shifted_stacks
        try:
            with (
                _installed(self._configs),
                _shifted_positions(
                    self._positions, lambda stack: self.num_virtual_tokens * (stack in stacks)
                ),
            ):
                yield
        finally:
            _RUN.reset(token)

    @staticmethod
    @contextlib.contextmanager
    def routed_scope(model: nn.Module, per_group: list[list[nn.Module]], routing: Routing) -> Iterator[None]:
        """Per-sample prefixes for the span of one call: group ``g``'s prefixes (concatenated
        when it stacks several) apply to the samples ``routing`` puts in group ``g``."""
        encoders = [e for group in per_group for e in group]
        assert all(isinstance(e, PrefixEncoder) for e in encoders)
        _refuse_checkpointing(model)
        run = _Run(_RUN.get(), routing)
        by_module: dict[nn.Module, list[list[tuple[_Site, torch.Tensor, tuple[int, int]]]]] = {}
        configs: list[Any] = []
        for g, group in enumerate(per_group):
            for encoder in group:
                assert isinstance(encoder, PrefixEncoder)
                table = encoder.key_values()
                for site in encoder._sites:
                    assert site.slots is not None
                    slots = by_module.setdefault(site.module, [[] for _ in per_group])
                    slots[g].append((site, table, site.slots))
                configs += [c for c in encoder._configs if all(c is not d for d in configs)]
        for module, groups in by_module.items():
            run.entries.pop(module, None)
            run.add_routed(module, groups)
        prefixes = [[e for e in group if isinstance(e, PrefixEncoder)] for group in per_group]
        positions = list(
            {id(p.module): p for group in prefixes for e in group for p in e._positions}.values()
        )

        def shift(stack: str) -> torch.Tensor:
            # each group's samples are numbered after that group's prefixes of this stack
            return torch.tensor(
                [sum(e.num_virtual_tokens for e in group if stack in e.shifted_stacks) for group in prefixes]
            )

        token = _RUN.set(run)
        try:
            with _installed(configs), _shifted_positions(positions, shift):
                yield
        finally:
            _RUN.reset(token)


def _refuse_checkpointing(model: nn.Module) -> None:
    if (
        torch.is_grad_enabled()
        and model.training
        and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ):
        raise ValueError(
            "prefix tuning does not work with gradient checkpointing (the recomputed attention would "
            "run without the prefix); call model.gradient_checkpointing_disable()"
        )


# ---- positions after the prefix --------------------------------------------------------------
_POSITION_EMBEDDINGS = frozenset({"wpe", "embed_positions", "position_embeddings"})
_CACHE_LENGTH_ARGS = ("cache_length", "past_key_values_length")


@dataclass
class _Positions:
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


def _position_embeddings(model: nn.Module, stacks: set[str]) -> list[_Positions]:
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
        cache_arg = None
        if type(module).forward is not nn.Embedding.forward:
            params = inspect.signature(type(module).forward).parameters
            cache_arg = next((a for a in _CACHE_LENGTH_ARGS if a in params), None)
            if cache_arg is None:
                raise ValueError(
                    f"prefix tuning: the position embedding {name} ({type(module).__name__}) takes positions "
                    "in a way peftlab does not know, so real tokens could not be numbered after the prefix "
                    "as HF PEFT does; this architecture is not supported"
                )
        found.append(_Positions(module, name, stack, cache_arg, parent))
    return found


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return None


@contextlib.contextmanager
def _shifted_positions(
    positions: list[_Positions], shift: Callable[[str], torch.Tensor | int]
) -> Iterator[None]:
    """Number real tokens after the prefix for the span of the block: ``shift(stack)`` is one
    length for every sample, or a tensor of one length per routing group (``_Run.routing``)."""
    handles: list[Any] = []
    batches: dict[int, int] = {}

    def per_row(amount: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        run = _RUN.get()
        assert run is not None and run.routing is not None
        return amount.to(device)[run.routing.sample_index(batch, device)]

    def check(entry: _Positions, top: int) -> None:
        if top >= entry.size:
            raise ValueError(
                f"the prefix moves real tokens to position {top}, but {entry.name} has only {entry.size} "
                "positions; shorten the input or use fewer num_virtual_tokens"
            )

    for entry in positions:
        amount = shift(entry.stack)
        if isinstance(amount, int) and amount == 0:
            continue

        def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            batch = _batch_of(args, kwargs)
            if batch is not None:
                batches[id(module)] = batch

        def before(
            module: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            entry: _Positions = entry,
            amount: torch.Tensor | int = amount,
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if entry.cache_arg is None:  # nn.Embedding: the positions are its input
                ids = args[0]
                if isinstance(amount, int):
                    moved = ids + amount
                else:
                    batch = batches.get(id(entry.parent), ids.shape[0])
                    moved = ids + per_row(amount, batch, ids.device).view(-1, *([1] * (ids.dim() - 1)))
                check(entry, int(moved.max()))
                return (moved, *args[1:]), kwargs
            if not isinstance(amount, int):
                return None  # per sample: after() computes each shift's rows
            return _with_cache_shift(entry, args, kwargs, amount)

        def after(
            module: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            output: torch.Tensor,
            entry: _Positions = entry,
            amount: torch.Tensor | int = amount,
        ) -> torch.Tensor | None:
            if entry.cache_arg is None or isinstance(amount, int):
                return None
            # the output may be one row for the whole batch (positions given as a 1D range)
            batch = max(output.shape[0], batches.get(id(entry.parent), output.shape[0]))
            rows = per_row(amount, batch, output.device)
            out = output.expand(batch, *output.shape[1:])
            for value in torch.unique(rows).tolist():
                moved_args, moved_kwargs = _with_cache_shift(entry, args, kwargs, int(value))
                part = type(module).forward(module, *moved_args, **moved_kwargs)
                out = torch.where((rows == value).view(-1, *([1] * (out.dim() - 1))), part, out)
            return out

        if not isinstance(amount, int):
            handles.append(entry.parent.register_forward_pre_hook(remember, with_kwargs=True))
        handles.append(entry.module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(entry.module.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _with_cache_shift(
    entry: _Positions, args: tuple[Any, ...], kwargs: dict[str, Any], amount: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """BART-style call arguments with the positions moved by ``amount``."""
    assert entry.cache_arg is not None
    kwargs = dict(kwargs)
    given = kwargs.get("position_ids")
    if isinstance(given, torch.Tensor):
        kwargs["position_ids"] = given + amount
        return args, kwargs
    if len(args) > 1:
        args = (args[0], int(args[1]) + amount, *args[2:])
    else:
        kwargs[entry.cache_arg] = int(kwargs.get(entry.cache_arg, 0)) + amount
    seq = args[0].shape[1] if isinstance(args[0], torch.Tensor) and args[0].dim() > 1 else 0
    top = (int(args[1]) if len(args) > 1 else int(kwargs[entry.cache_arg])) + seq - 1
    if top >= entry.size:
        raise ValueError(
            f"the prefix moves real tokens to position {top}, but {entry.name} has only {entry.size} "
            "positions; shorten the input or use fewer num_virtual_tokens"
        )
    return args, kwargs


# ---- the attention seam --------------------------------------------------------------------
class _Run:
    """The prefixes in force for one call: per attention module, the (table, slots) pairs of
    every active prefix adapter, plus small caches valid only for this call."""

    def __init__(self, parent: _Run | None, routing: Routing | None = None) -> None:
        self.entries: dict[nn.Module, list[tuple[_Site, torch.Tensor, tuple[int, int]]]] = {}
        if parent is not None:
            self.entries = {m: list(v) for m, v in parent.entries.items()}
        # per-sample prefixes: per module, keys and values (G, heads, P, dim) right-aligned
        # (a shorter prefix sits next to the real tokens) and which of the P columns are real
        self.routing = routing
        self.routed: dict[nn.Module, tuple[_Site, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._kv: dict[
            tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
        ] = {}
        self._masks: list[tuple[Any, Any, torch.Tensor | None]] = []

    def add(self, site: _Site, table: torch.Tensor, slots: tuple[int, int]) -> None:
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
        routed = self.routed.get(module)
        if routed is not None:
            assert self.routing is not None
            site, keys_t, values_t, visible = routed
            _check_heads(site, keys_t, key, dim=1)
            index = self.routing.sample_index(batch, key.device)
            result = (keys_t[index].to(key.dtype), values_t[index].to(key.dtype), visible[index])
            self._kv[cache_key] = result
            return result
        found = self.entries.get(module)
        if found is None:
            return None
        keys, values = [], []
        for site, table, (k, v) in found:
            _check_heads(site, table, key, dim=1)
            keys.append(table[k].to(key.dtype))
            values.append(table[v].to(key.dtype))
        pk = torch.cat(keys, dim=1).unsqueeze(0).expand(batch, -1, -1, -1)
        pv = torch.cat(values, dim=1).unsqueeze(0).expand(batch, -1, -1, -1)
        self._kv[cache_key] = (pk, pv, None)
        return pk, pv, None

    def add_routed(
        self, module: nn.Module, per_group: list[list[tuple[_Site, torch.Tensor, tuple[int, int]]]]
    ) -> None:
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


def _check_heads(site: _Site, table: torch.Tensor, key: torch.Tensor, dim: int) -> None:
    """The prefix table (.., heads, P, head_dim) must fit the model's keys (b, heads, kv, head_dim)."""
    heads, head_dim = table.shape[dim], table.shape[-1]
    if heads != key.shape[1] or head_dim != key.shape[3]:
        raise ValueError(
            f"prefix for {site.name} has {heads} heads x {head_dim} dims but the "
            f"model's keys have {key.shape[1]} x {key.shape[3]}; set token_dim / num_attention_heads "
            "to the model's num_key_value_heads * head_dim / num_key_value_heads"
        )


_RUN: ContextVar[_Run | None] = ContextVar("peftlab_prefix_run", default=None)


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


def _prefix_bias(
    source: nn.Module | None, bias: torch.Tensor, q_len: int, kv_len: int, prefix_len: int
) -> torch.Tensor:
    """Relative-position-bias columns for the prefix, placed just before the first real token."""
    shape = (bias.shape[0], bias.shape[1], bias.shape[2], prefix_len)
    if source is None:
        return torch.zeros(shape, dtype=bias.dtype, device=bias.device)
    past = kv_len - q_len
    full = source.compute_bias(  # type: ignore[operator]
        q_len, prefix_len + kv_len, device=bias.device, past_seen_tokens=prefix_len + past
    )
    return full[..., :prefix_len].to(bias.dtype).expand(shape)


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
    run = _RUN.get()
    prefix = run.prefix(module, key) if run is not None else None
    if run is None or prefix is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    pk, pv, seen = prefix
    prefix_len, q_len, kv_len = pk.shape[2], query.shape[2], key.shape[2]
    if attention_mask is not None:
        mask = attention_mask
        attention_mask = run.memo(mask, (prefix_len, id(seen)), lambda: _extend_mask(mask, prefix_len, seen))
    elif seen is not None:
        causal: Any = False
        if impl == "sdpa" and q_len > 1:
            causal = kwargs.get("is_causal")
            if causal is None:
                causal = getattr(module, "is_causal", True)
        routed_seen = seen
        attention_mask = run.memo(
            None,
            ("routed", q_len, kv_len, id(seen), bool(causal), query.dtype),
            lambda: _routed_mask(impl, routed_seen, q_len, kv_len, bool(causal), query.dtype),
        )
    elif impl == "sdpa" and q_len > 1:
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = getattr(module, "is_causal", True)
        if causal:
            # with the prefix in front, sdpa's is_causal would hide real keys from the queries
            attention_mask = run.memo(
                None,
                (q_len, kv_len, prefix_len, query.device),
                lambda: _causal_with_prefix(q_len, kv_len, prefix_len, query.device),
            )
    bias = kwargs.get("position_bias")
    if isinstance(bias, torch.Tensor):
        source = run.bias_source(module)
        extra = _prefix_bias(source, bias, q_len, kv_len, prefix_len)
        kwargs["position_bias"] = torch.cat([extra, bias], dim=-1)
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


def _wrapped_impl(config: Any) -> str:
    """The implementation a config uses now (seen through our wrapper), checked to be wrappable."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    impl = impl.removeprefix(_IMPL_PREFIX)
    if impl not in _WRAPPED:
        raise ValueError(
            f"prefix tuning works with attn_implementation 'sdpa' or 'eager', this model uses {impl!r}; "
            "load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )
    return impl


@contextlib.contextmanager
def _installed(configs: list[Any]) -> Iterator[None]:
    """Point each config at the prefix wrapper of its implementation while any call needs it."""
    _register()
    with _INSTALL_LOCK:
        for config in configs:
            entry = _INSTALLED.get(id(config))
            if entry is None:
                impl = _wrapped_impl(config)
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


# ---- the method ----------------------------------------------------------------------------
class PrefixTuningMethod(Method):
    peft_type = "PREFIX_TUNING"
    config_class = PrefixTuningConfig
    name = "prefix tuning"
    mergeable = False
    unmergeable_reason = (
        "prefix tuning adds learned key/value vectors to attention, there is no weight to fold them "
        "into; keep the adapter (PrefixEncoder.fold_projection() turns a projected prefix into plain vectors)"
    )

    def create_model_adapter(self, model: nn.Module, config: PrefixTuningConfig) -> nn.Module:
        num_layers, kv_heads, head_dim = model_kv_shape(model)
        _fill_derived(config, num_layers, kv_heads, head_dim)
        sites = _attention_sites(model)
        num_slots = _assign_slots(sites, config, num_layers)
        adapted = [s for s in sites if s.slots is not None]
        for site in adapted:
            if getattr(sys.modules[type(site.module).__module__], "ALL_ATTENTION_FUNCTIONS", None) is None:
                raise ValueError(
                    f"{type(site.module).__name__} does not use transformers' attention interface, the seam "
                    "prefix tuning enters through; this architecture is not supported"
                )
        configs: list[Any] = []
        candidates = [getattr(model, "config", None)] + [getattr(s.module, "config", None) for s in adapted]
        for candidate in candidates:
            if candidate is not None and all(candidate is not c for c in configs):
                _wrapped_impl(candidate)  # fail now, not at the first call
                configs.append(candidate)
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        encoder = PrefixEncoder(
            config,
            sites,
            num_slots,
            kv_heads,
            head_dim,
            configs,
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None else None,
        )
        encoder._rope = _rotary_of(model, adapted, head_dim)
        if encoder._rope is None:
            encoder._positions = _position_embeddings(model, encoder.shifted_stacks)
        return encoder

    def export_model_adapter(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``{"prompt_embeddings": plain prefix}``, what HF PEFT saves (with projection too),
        in PEFT's position numbering (see :meth:`PrefixEncoder.peft_vectors`)."""
        assert isinstance(module, PrefixEncoder)
        return {"prompt_embeddings": module.peft_vectors()}

    def import_model_adapter(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        assert isinstance(module, PrefixEncoder)
        extra = sorted(set(state) - {"prompt_embeddings"})
        if "prompt_embeddings" not in state or extra:
            raise ValueError(
                f"a prefix-tuning checkpoint holds exactly 'prompt_embeddings'; got keys {sorted(state)}"
            )
        module.load_peft_vectors(state["prompt_embeddings"])

    def adapted_modules(self, host: AdapterHost, adapter_name: str) -> list[str]:
        """The attention modules the prefix enters."""
        encoder = host.model_adapters[adapter_name] if adapter_name in host.model_adapters else None  # noqa: SIM401
        return encoder.site_names() if isinstance(encoder, PrefixEncoder) else []

    def combine(
        self, host: AdapterHost, inputs: Inputs, adapter_name: str, combination_type: str, **options: Any
    ) -> tuple[PeftConfig, Values]:
        """``P = sum_i w_i P_i`` of the plain prefix vectors of same-shaped prefixes (a projected
        prefix is folded to its vectors first: the mean of MLPs is no prefix's MLP); the result
        has no projection."""
        first_name = inputs[0][0]
        first_config = host.peft_config[first_name]
        total: torch.Tensor | None = None
        for name, w in inputs:
            config = host.peft_config[name]
            for field in _PREFIX_LAYOUT:
                mine, theirs = getattr(config, field), getattr(first_config, field)
                if mine != theirs:
                    raise ValueError(
                        f"prefix adapters {first_name!r} and {name!r} differ in {field} "
                        f"({theirs} vs {mine}); "
                        "a weighted average needs same-shaped prefixes: give them the same " + field
                    )
            encoder = host.model_adapters[name]
            assert isinstance(encoder, PrefixEncoder)
            term = combination.wide(encoder.prefix_vectors()) * w
            if total is not None and term.shape != total.shape:
                raise ValueError(
                    f"prefix adapters {first_name!r} and {name!r} have prefixes of shapes "
                    f"{tuple(total.shape)} and {tuple(term.shape)}; a weighted average needs same-shaped "
                    "prefixes (the same model layout)"
                )
            total = term if total is None else total + term
        assert total is not None
        config = combination.copy_config(first_config, prefix_projection=False, modules_to_save=None)
        return config, {f"model_adapters.{adapter_name}.embedding.weight": total}


# what must agree for prefixes to be averaged
_PREFIX_LAYOUT = (
    "task_type",
    "num_virtual_tokens",
    "encoder_prefix",
    "cross_prefix",
    "num_transformer_submodules",
)


def _rotary_of(
    model: nn.Module, sites: list[_Site], head_dim: int
) -> tuple[nn.Module, Callable[..., Any]] | None:
    """The model's one full-width rotary embedding and its apply function, if it has them."""
    rotaries = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "rotary_emb"]
    if len(rotaries) != 1 or not sites:
        return None
    inv_freq = getattr(rotaries[0], "inv_freq", None)
    apply_rotary = getattr(sys.modules[type(sites[0].module).__module__], "apply_rotary_pos_emb", None)
    if not isinstance(inv_freq, torch.Tensor) or 2 * inv_freq.numel() != head_dim or apply_rotary is None:
        return None
    return rotaries[0], apply_rotary


def _fill_derived(config: PrefixTuningConfig, num_layers: int, kv_heads: int, head_dim: int) -> None:
    """Fill PEFT's derived fields from the model, or check the ones already set agree with it."""
    derived = {
        "num_layers": num_layers,
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_transformer_submodules": 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1,
    }
    for name, value in derived.items():
        current = getattr(config, name)
        if current is None:
            setattr(config, name, value)
        elif current != value and name != "num_transformer_submodules":
            raise ValueError(
                f"PrefixTuningConfig.{name}={current} does not fit this model ({name}={value} with "
                f"{num_layers} layers, {kv_heads} key/value heads of {head_dim} dims); the adapter was made "
                "for another model, or leave the field unset"
            )
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
