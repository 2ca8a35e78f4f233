"""What a model carrying adapters exposes to methods, checkpoints and combination.

:class:`~peftlab.core.peft_model.PeftModel` is the implementation; the modules below it
(checkpoints, weighted combination, each method's combination rule) depend only on this
protocol, so none of them imports the model class.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from peftlab.core.config import PeftConfig


class AdapterHost(Protocol):
    base_model: nn.Module
    peft_config: dict[str, PeftConfig]
    model_adapters: nn.ModuleDict  # adapters that live beside the model (prefix tuning)

    def require_adapter(self, adapter_name: str) -> None:
        """Raise ValueError naming the adapters there are when ``adapter_name`` is not one."""

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Every parameter the adapter declares, by its path in the model."""

    def bias_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The base model's biases this adapter trains (LoRA ``bias="all"`` / ``"lora_only"``)."""
