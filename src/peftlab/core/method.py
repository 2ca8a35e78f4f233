"""What a method supplies to the framework, and the defaults most methods share.

A module-level method (LoRA, IA3, bottleneck) says which modules its config targets and
builds one :class:`~peftlab.core.layers.AdapterUnit` per target; the shared injection code
does the wrapping. A model-level method (prefix tuning) creates one module beside the model
instead (:meth:`Method.create_model_adapter`) that enters the model's calls through a seam of
its own. Everything method-specific lives on the method: its config class, default targets
per architecture, whether and why it merges, whether it trains under activation checkpointing,
and how weighted combination works for it. Applications ask these traits, never the method's name.
A method is registered with :func:`peftlab.core.registry.register_method`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import combination
from peftlab.core.combination import Computed, Inputs
from peftlab.core.config import PeftConfig
from peftlab.core.host import AdapterHost
from peftlab.core.injection import candidate_suffixes, find_targets, wrap, wrapped_modules
from peftlab.core.layers import AdaptedModule, AdapterState, AdapterUnit

Targets = list[str] | str

# architectures whose modules are named as another's: they take that one's default targets
SAME_LAYOUT: dict[str, str] = {"mistral": "llama", "qwen2": "llama", "roberta": "bert"}


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture_of(model: nn.Module) -> str | None:
    """The key of the methods' per-architecture default tables for ``model``."""
    model_type = model_type_of(model)
    return SAME_LAYOUT.get(model_type, model_type) if model_type else None


class Method:
    """A PEFT method. Subclasses set the class attributes and implement either the module-level
    pair (:meth:`targets`, :meth:`make_unit`) or :meth:`create_model_adapter`."""

    peft_type: ClassVar[str]
    config_class: ClassVar[type[PeftConfig]]
    name: ClassVar[str] = ""  # for messages: "LoRA", "IA3", ...
    mergeable: ClassVar[bool] = False
    unmergeable_reason: ClassVar[str] = ""
    # False where activation (gradient) checkpointing would compute wrong results; the conflict
    # says why, in words that follow "<name> does not work with gradient checkpointing" (see
    # checkpointing_refusal)
    supports_activation_checkpointing: ClassVar[bool] = True
    activation_checkpointing_conflict: ClassVar[str] = ""
    # what add_weighted_adapter offers for this method, and its extra options per type
    combination_types: ClassVar[tuple[str, ...]] = ("linear",)
    combination_options: ClassVar[dict[str, tuple[str, ...]]] = {}

    @property
    def label(self) -> str:
        return self.name or self.peft_type

    def checkpointing_refusal(self) -> str:
        """The sentence refusing activation checkpointing for this method ("" where it supports it),
        e.g. "prefix tuning does not work with gradient checkpointing (the recomputed attention
        would run without the prefix)"; callers add what the user should do."""
        if self.supports_activation_checkpointing:
            return ""
        conflict = self.activation_checkpointing_conflict
        return f"{self.label} does not work with gradient checkpointing ({conflict})"

    # ---- module-level adapters ----------------------------------------------------------
    def targets(self, model: nn.Module, config: Any) -> dict[str, Any]:
        """Map each target module name to a role the method understands (e.g. feed-forward)."""
        raise NotImplementedError

    def make_unit(self, base_layer: nn.Module, config: Any, role: Any) -> AdapterUnit:
        raise NotImplementedError

    @property
    def is_module_level(self) -> bool:
        return type(self).targets is not Method.targets

    def inject(
        self, model: nn.Module, config: Any, adapter_name: str, state: AdapterState
    ) -> list[AdaptedModule]:
        """Wrap every target and give it this adapter's unit; returns the wrappers touched."""
        touched: list[AdaptedModule] = []
        if not self.is_module_level:
            return touched
        for name, role in self.targets(model, config).items():
            wrapper = wrap(model, name, state)
            try:
                unit = self.make_unit(wrapper.base_layer, config, role)
            except TypeError as err:
                raise ValueError(f"{self.label} cannot adapt {name}: {err}") from None
            wrapper.add_unit(adapter_name, unit)
            touched.append(wrapper)
        return touched

    # ---- model-level adapters -----------------------------------------------------------
    def create_model_adapter(self, model: nn.Module, config: Any) -> nn.Module | None:
        """A module holding a model-level adapter's parameters (prefix tuning), else None."""
        return None

    def export_model_adapter(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A model-level adapter's tensors under HF PEFT's state-dict keys (checkpoint boundary)."""
        return {name: p.detach() for name, p in module.named_parameters()}

    def import_model_adapter(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_model_adapter`: load PEFT-keyed tensors into ``module``."""
        module.load_state_dict(state, strict=True)

    def adapted_modules(self, host: AdapterHost, adapter_name: str) -> list[str]:
        """Names of the modules where the adapter acts (what ``peftlab count`` reports)."""
        return [n for n, w in wrapped_modules(host.base_model) if adapter_name in w.adapters]

    # ---- weighted combination -----------------------------------------------------------
    def combine(
        self, host: AdapterHost, inputs: Inputs, adapter_name: str, combination_type: str, **options: Any
    ) -> tuple[PeftConfig, Computed]:
        """The config and parameter values of a weighted combination of ``inputs`` (checked to be
        adapters of this method with finite parameters); the values may be a function computing
        them once the new adapter exists (see ``combination.Computed``). The default, for
        module-level methods: every unit parameter ``p = sum_i w_i p_i``, for inputs on the same
        modules whose units pass :meth:`check_combinable`, with the first input's config."""
        if not self.is_module_level:
            raise ValueError(f"{self.label} adapters cannot be combined: the method has no combination rule")
        combination.same_modules(host, inputs, self.label)
        values, firsts = combination.weighted_unit_sums(host, inputs, adapter_name, self.check_combinable)
        return self.combined_config(host, inputs, firsts), values

    def check_combinable(
        self, module: str, first_name: str, name: str, first: AdapterUnit, unit: AdapterUnit
    ) -> None:
        """Raise ValueError when ``unit`` (of input ``name`` at ``module``) cannot be averaged with
        ``first`` (the first input's); the default asks for same-shaped parameters."""
        combination.check_same_shapes(self.label, module, first_name, name, first, unit)

    def combined_config(
        self, host: AdapterHost, inputs: Inputs, firsts: dict[str, AdapterUnit]
    ) -> PeftConfig:
        """The combined adapter's config: the first input's, without ``modules_to_save``; it
        must select the same modules."""
        first = host.peft_config[inputs[0][0]]
        changes = {"modules_to_save": None} if hasattr(first, "modules_to_save") else {}
        config = combination.copy_config(first, **changes)
        if set(self.targets(host.base_model, config)) != set(firsts):
            raise RuntimeError(f"internal error: {inputs[0][0]!r}'s config no longer selects its modules")
        return config


def resolve_targets(
    model: nn.Module,
    configured: list[str] | str | None,
    default: list[str] | str | None,
    *,
    method: str,
    field: str = "target_modules",
    layers_to_transform: list[int] | None = None,
) -> list[str]:
    """Names selected by ``configured``, falling back to the architecture's ``default``."""
    target = configured if configured is not None else default
    if target is None:
        model_type = model_type_of(model)
        raise ValueError(
            f"{method}: no default {field} for architecture {model_type or type(model).__name__!r}; "
            f"set {field} to some of: {', '.join(candidate_suffixes(model))}"
        )
    return find_targets(model, target, field=field, layers_to_transform=layers_to_transform)
