"""Prefix tuning as a :class:`~peftlab.core.method.Method`: creating the adapter on a model, its
checkpoint boundary, what ``peftlab count`` reports and weighted combination."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.core import combination
from peftlab.core.combination import Inputs, Values
from peftlab.core.config import PeftConfig
from peftlab.core.host import AdapterHost
from peftlab.core.method import Method
from peftlab.methods.prefix.attention import switched_configs
from peftlab.methods.prefix.config import PrefixTuningConfig, fill_derived
from peftlab.methods.prefix.encoder import PrefixEncoder
from peftlab.methods.prefix.positions import position_embeddings, rotary_of
from peftlab.methods.prefix.sites import assign_slots, attention_sites, model_kv_shape, prefixed_stacks

# what must agree for prefixes to be averaged
_PREFIX_LAYOUT = (
    "task_type",
    "num_virtual_tokens",
    "encoder_prefix",
    "cross_prefix",
    "num_transformer_submodules",
)


class PrefixTuningMethod(Method):
    peft_type = "PREFIX_TUNING"
    config_class = PrefixTuningConfig
    name = "prefix tuning"
    mergeable = False
    unmergeable_reason = (
        "prefix tuning adds learned key/value vectors to attention, there is no weight to fold them "
        "into; keep the adapter (PrefixEncoder.fold_projection() turns a projected prefix into plain vectors)"
    )
    supports_activation_checkpointing = False
    activation_checkpointing_conflict = "the recomputed attention would run without the prefix"

    def create_model_adapter(self, model: nn.Module, config: PrefixTuningConfig) -> nn.Module:
        num_layers, kv_heads, head_dim = model_kv_shape(model)
        fill_derived(config, num_layers, kv_heads, head_dim)
        sites = attention_sites(model)
        num_slots = assign_slots(sites, config, num_layers)
        adapted = [s for s in sites if s.slots is not None]
        configs = switched_configs(model, adapted)
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        rope = rotary_of(model, adapted, head_dim)
        # rotary models keep real tokens at their positions (the checkpoint is converted instead)
        positions = position_embeddings(model, prefixed_stacks(adapted)) if rope is None else []
        return PrefixEncoder(
            config,
            sites,
            num_slots,
            kv_heads,
            head_dim,
            configs,
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None else None,
            rope=rope,
            positions=positions,
        )

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
            _check_same_layout(first_name, first_config, name, host.peft_config[name])
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


def _check_same_layout(first_name: str, first_config: PeftConfig, name: str, config: PeftConfig) -> None:
    for field in _PREFIX_LAYOUT:
        mine, theirs = getattr(config, field), getattr(first_config, field)
        if mine != theirs:
            raise ValueError(
                f"prefix adapters {first_name!r} and {name!r} differ in {field} "
                f"({theirs} vs {mine}); "
                "a weighted average needs same-shaped prefixes: give them the same " + field
            )
