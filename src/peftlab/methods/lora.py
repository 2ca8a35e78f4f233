"""LoRA: low-rank updates to frozen linear layers (Hu et al., 2021, arXiv:2106.09685).

For a frozen weight W (out x in) LoRA learns A (r x in) and B (out x r) and computes

    y = W x + s * B A dropout(x),     s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

B starts at zero so the adapted model starts equal to the base. Merging adds s * B A to W;
unmerging subtracts it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.architectures import defaults_for
from peftlab.config import (
    PeftConfig,
    TaskType,
    check_positive_int,
    check_probability,
    normalize_targets,
)
from peftlab.layers import AdapterUnit, Stage, base_weight, is_conv1d, linear_features
from peftlab.methods.base import Method, model_type_of, resolve_targets

BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter; field names and meanings follow HF PEFT."""

    peft_type: ClassVar[str] = "LORA"
    PEFT_DEFAULTS: ClassVar[dict[str, Any]] = {
        "exclude_modules": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "trainable_token_indices": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "use_dora": False,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "qalora_group_size": 16,
        "monteclora_config": None,
        "layer_replication": None,
        "lora_bias": False,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    task_type: TaskType | str | None = None
    # PEFT's flag for GPT-2's Conv1D layout; peftlab detects the layout itself, so the value
    # is only carried through to the saved config for PEFT's benefit
    fan_in_fan_out: bool = field(default=False, repr=False)

    def validate(self) -> None:
        check_positive_int("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"lora_alpha: must be a number, got {self.lora_alpha!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {self.lora_alpha!r}")
        check_probability("lora_dropout", self.lora_dropout)
        self.target_modules = normalize_targets("target_modules", self.target_modules)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias: {self.bias!r} is not one of {', '.join(BIAS_MODES)}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora: must be True or False, got {self.use_rslora!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights: {self.init_lora_weights!r} is not supported; use True "
                "(Kaiming A, zero B), 'gaussian' (normal A, zero B) or False (random A and B)"
            )
        self.modules_to_save = _check_modules_to_save(self.modules_to_save)
        self.layers_to_transform = _check_layers(self.layers_to_transform)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_modules_to_save(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"modules_to_save: must be a list of module names, got {value!r}")
    return list(value)


def _check_layers(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise ValueError(f"layers_to_transform: must be layer indices >= 0, got {value!r}")
    return list(items)


class LoraUnit(AdapterUnit):
    """``lora_A`` / ``lora_B`` for one wrapped layer (names match HF PEFT's state-dict keys)."""

    stage = "delta"
    mergeable = True

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        in_features, out_features = linear_features(base_layer)
        weight = base_weight(base_layer)
        kw: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.Linear(in_features, config.r, bias=False, **kw)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, **kw)
        self.lora_dropout: nn.Module = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.scaling = config.scaling
        self.reset_parameters(config.init_lora_weights, config.r)

    def reset_parameters(self, init: bool | str, r: int) -> None:
        if init is False:
            return  # nn.Linear's own random init for both A and B: for tests
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight
        # scale the r-wide intermediate rather than the out-wide result: fewer multiplies
        return self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))) * self.scaling)

    @classmethod
    def routed(
        cls,
        stage: Stage,
        per_group: Sequence[Sequence[AdapterUnit]],
        index: torch.Tensor,
        t: torch.Tensor,
        cache: dict[Any, Any],
    ) -> torch.Tensor | None:
        """Per-sample LoRA in two batched products (as Punica / S-LoRA do): each group's A's
        stacked along the rank (a Stack's deltas add) and zero-padded to a common rank R,
        gathered per sample, ``x (b, L, in) @ A_i^T (b, in, R) @ (s B_i)^T (b, R, out)``."""
        units = [u for group in per_group for u in group]
        assert all(isinstance(u, LoraUnit) for u in units)
        lora = [[u for u in group if isinstance(u, LoraUnit)] for group in per_group]
        if any(u.training and not isinstance(u.lora_dropout, nn.Identity) for g in lora for u in g):
            # dropout masks are drawn per adapter; keep that exact by running groups apart
            return super().routed(stage, per_group, index, t, cache)
        # without autograd the gathered weights serve every decoding step of the call
        reuse = not torch.is_grad_enabled()
        key = ("gathered", index.shape[0], index.device)
        gathered = cache.get(key) if reuse else None
        if gathered is None:
            stacked = _stacked(lora)
            if stacked is None:
                return None
            a, b = stacked
            gathered = (a[index].transpose(1, 2), b[index].transpose(1, 2))
            if reuse:
                cache[key] = gathered
        a_t, b_t = gathered
        x = t.reshape(t.shape[0], -1, t.shape[-1]).to(a_t.dtype)
        out = torch.bmm(torch.bmm(x, a_t), b_t)
        return out.reshape(*t.shape[:-1], out.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """s * B A in the (out, in) layout of nn.Linear."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta

    def merged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = base_weight(base_layer)
        return w + self._layout(self.delta_weight()).to(w.dtype), None

    def unmerged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = base_weight(base_layer)
        return w - self._layout(self.delta_weight()).to(w.dtype), None


def _stacked(groups: list[list[LoraUnit]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A (G, R, in), s*B (G, out, R)) per group, zero-padded to the largest summed rank R."""
    ranks = [sum(u.lora_A.weight.shape[0] for u in g) for g in groups]
    width = max(ranks)
    if width == 0:
        return None
    first = next(u for g in groups for u in g)
    a_ref, b_ref = first.lora_A.weight, first.lora_B.weight
    a_rows, b_cols = [], []
    for group, rank in zip(groups, ranks, strict=True):
        a_parts = [u.lora_A.weight for u in group]
        b_parts = [u.lora_B.weight * u.scaling for u in group]
        if rank < width:
            a_parts.append(a_ref.new_zeros(width - rank, a_ref.shape[1]))
            b_parts.append(b_ref.new_zeros(b_ref.shape[0], width - rank))
        a_rows.append(torch.cat(a_parts, 0))
        b_cols.append(torch.cat(b_parts, 1))
    return torch.stack(a_rows), torch.stack(b_cols)


class LoraMethod(Method):
    peft_type = "LORA"
    config_class = LoraConfig
    mergeable = True

    def targets(self, model: nn.Module, config: LoraConfig) -> dict[str, Any]:
        arch = defaults_for(model_type_of(model))
        names = resolve_targets(
            model,
            config.target_modules,
            arch.lora if arch else None,
            method="LoRA",
            layers_to_transform=config.layers_to_transform,  # type: ignore[arg-type]
        )
        return {name: None for name in names}

    def make_unit(self, base_layer: nn.Module, config: LoraConfig, role: Any) -> AdapterUnit:
        linear_features(base_layer)  # clear error for non-linear targets
        return LoraUnit(base_layer, config)
