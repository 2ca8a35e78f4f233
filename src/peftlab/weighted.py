"""Weighted combinations of existing adapters (``PeftModel.add_weighted_adapter``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftlab.peft_model import PeftModel


def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
    **kwargs: Any,
) -> None:
    raise NotImplementedError("add_weighted_adapter is being written")
