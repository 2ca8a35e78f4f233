"""What a method supplies to the framework.

A module-level method (LoRA, IA3, bottleneck) says which modules its config targets and
builds one :class:`~peftlab.layers.AdapterUnit` per target; the shared injection code does
the wrapping. A model-level method (prefix tuning) overrides :meth:`Method.inject` instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.config import PeftConfig
from peftlab.injection import find_targets, wrap
from peftlab.layers import AdaptedModule, AdapterState, AdapterUnit


class Method:
    peft_type: ClassVar[str]
    config_class: ClassVar[type[PeftConfig]]
    mergeable: ClassVar[bool] = False
    unmergeable_reason: ClassVar[str] = ""

    def targets(self, model: nn.Module, config: Any) -> dict[str, Any]:
        """Map each target module name to a role the method understands (e.g. feed-forward)."""
        raise NotImplementedError

    def make_unit(self, base_layer: nn.Module, config: Any, role: Any) -> AdapterUnit:
        raise NotImplementedError

    def create_model_adapter(self, model: nn.Module, config: Any) -> nn.Module | None:
        """A module holding a model-level adapter's parameters (prefix tuning), else None."""
        return None

    def export_model_adapter(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A model-level adapter's tensors under HF PEFT's state-dict keys (checkpoint boundary)."""
        return {name: p.detach() for name, p in module.named_parameters()}

    def import_model_adapter(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_model_adapter`: load PEFT-keyed tensors into ``module``."""
        module.load_state_dict(state, strict=True)

    def inject(
        self, model: nn.Module, config: Any, adapter_name: str, state: AdapterState
    ) -> list[AdaptedModule]:
        """Wrap every target and give it this adapter's unit; returns the wrappers touched."""
        touched: list[AdaptedModule] = []
        if type(self).targets is Method.targets:
            return touched  # a model-level method: nothing to wrap
        for name, role in self.targets(model, config).items():
            wrapper = wrap(model, name, state)
            try:
                unit = self.make_unit(wrapper.base_layer, config, role)
            except TypeError as err:
                raise ValueError(f"{type(self).__name__[:-6]} cannot adapt {name}: {err}") from None
            wrapper.add_unit(adapter_name, unit)
            touched.append(wrapper)
        return touched


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
    from peftlab.injection import candidate_suffixes

    target = configured if configured is not None else default
    if target is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"{method}: no default {field} for architecture {model_type or type(model).__name__!r}; "
            f"set {field} to some of: {', '.join(candidate_suffixes(model))}"
        )
    return find_targets(model, target, field=field, layers_to_transform=layers_to_transform)


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)
