"""The learned prefix of one adapter, and its scopes: a model's calls with the prefix applied."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftlab.core.layers import Routing
from peftlab.core.registry import get_method
from peftlab.methods.prefix.attention import installed
from peftlab.methods.prefix.call import PrefixedCall, PrefixEntry, current_call, in_force
from peftlab.methods.prefix.config import PrefixTuningConfig
from peftlab.methods.prefix.positions import PositionEmbedding, Rotary, shifted_positions
from peftlab.methods.prefix.sites import AttentionSite, prefixed_stacks


class PrefixEncoder(nn.Module):
    """Holds one adapter's prefix and applies it to a model for the span of one call.

    Parameters (names as in HF PEFT): ``embedding.weight`` of shape
    ``(num_virtual_tokens, num_slots * num_kv_heads * head_dim)``; with projection
    ``embedding.weight`` ``(num_virtual_tokens, token_dim)`` and ``transform`` (MLP).
    ``rope`` is the model's rotary embedding (checkpoints are converted with it) and
    ``positions`` its learned absolute position embeddings that number real tokens after the
    prefix (see :mod:`peftlab.methods.prefix.positions`).
    """

    # the parameters are read here, not in forward(): FSDP2 all-gathers around these calls
    fsdp_forward_methods = ("key_values",)

    def __init__(
        self,
        config: PrefixTuningConfig,
        sites: list[AttentionSite],
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        configs: list[Any],
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        rope: Rotary | None = None,
        positions: list[PositionEmbedding] | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_slots, self.kv_heads, self.head_dim = num_slots, kv_heads, head_dim
        # plain lists, not submodules: the model's modules are not part of the adapter
        self._sites = [s for s in sites if s.slots is not None]
        self._configs = configs
        self._rope = rope
        # learned absolute positions to number after the prefix (stacks with a self-attention prefix)
        self._positions = list(positions or [])
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
        return prefixed_stacks(self._sites)

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
        call = PrefixedCall(current_call())
        for site in self._sites:
            assert site.slots is not None
            call.add(site, table, site.slots)
        stacks = self.shifted_stacks
        with (
            in_force(call),
            installed(self._configs),
            shifted_positions(self._positions, lambda stack: self.num_virtual_tokens * (stack in stacks)),
        ):
            yield

    @staticmethod
    @contextlib.contextmanager
    def routed_scope(model: nn.Module, per_group: list[list[nn.Module]], routing: Routing) -> Iterator[None]:
        """Per-sample prefixes for the span of one call: group ``g``'s prefixes (concatenated
        when it stacks several) apply to the samples ``routing`` puts in group ``g``."""
        encoders = [e for group in per_group for e in group]
        assert all(isinstance(e, PrefixEncoder) for e in encoders)
        _refuse_checkpointing(model)
        # without autograd the stacked prefixes (and their per-sample gathers) serve every call
        # that reuses this routing: every decoding step of a generate or of a continuous batch
        reuse = not torch.is_grad_enabled() and current_call() is None
        key = ("prefix", tuple(id(e) for e in encoders))
        made = routing.cache.get(key) if reuse else None
        if made is None:
            made = _routed_call(per_group, routing)
            if reuse:
                routing.cache[key] = made
        call, configs = made
        prefixes = [[e for e in group if isinstance(e, PrefixEncoder)] for group in per_group]
        positions = list(
            {id(p.module): p for group in prefixes for e in group for p in e._positions}.values()
        )

        def shift(stack: str) -> torch.Tensor:
            # each group's samples are numbered after that group's prefixes of this stack
            return torch.tensor(
                [sum(e.num_virtual_tokens for e in group if stack in e.shifted_stacks) for group in prefixes]
            )

        with in_force(call), installed(configs), shifted_positions(positions, shift):
            yield


def _routed_call(per_group: list[list[nn.Module]], routing: Routing) -> tuple[PrefixedCall, list[Any]]:
    """The call that gives each routing group its prefixes, and the configs those prefixes switch."""
    call = PrefixedCall(current_call(), routing)
    by_module: dict[nn.Module, list[list[PrefixEntry]]] = {}
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
        call.entries.pop(module, None)
        call.add_routed(module, groups)
    return call, configs


def _refuse_checkpointing(model: nn.Module) -> None:
    """A training call under activation checkpointing would lose the prefix when attention is
    recomputed; the method declares why (``PrefixTuningMethod.activation_checkpointing_conflict``)."""
    if (
        torch.is_grad_enabled()
        and model.training
        and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ):
        refusal = get_method(PrefixTuningConfig.peft_type).checkpointing_refusal()
        raise ValueError(f"{refusal}; call model.gradient_checkpointing_disable()")
