"""IA3: learned vectors that rescale activations (Liu et al., 2022, arXiv:2205.05638).

On attention key/value projections the output is scaled, ``y = l * (W x + b)``; on
feed-forward output projections the input is scaled, ``y = W (l * x) + b``. Vectors start
at one, so the adapted model starts equal to the base. Merging multiplies rows (output
scaling, bias included) or columns (input scaling) of W by l; unmerging divides.

Weighted combination: ``l = sum_i w_i l_i`` (the inputs must scale the same modules, in the
same roles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import combination
from peftlab.core.combination import Inputs
from peftlab.core.config import PeftConfig, TaskType, check_module_names, normalize_targets
from peftlab.core.host import AdapterHost
from peftlab.core.injection import exact_suffixes, find_targets
from peftlab.core.layers import AdapterUnit, Stage, base_bias, base_weight, is_conv1d, linear_features
from peftlab.core.method import Method, Targets, architecture_of, resolve_targets
from peftlab.core.quantized import unit_placement

# |l| below this cannot be divided back out of a merged weight without losing it
_MIN_INVERTIBLE = 1e-6
# target_modules=None: keys, values and the FFN's output projection, whose input is scaled
# (the feed-forward modules); peftlab uses this for every architecture (HF PEFT differs for
# bart and qwen2), and saved configs list the modules, so both libraries read the same adapter
DEFAULT_TARGETS: dict[str, Targets] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
    "t5": ["k", "v", "wo"],
    "bart": ["k_proj", "v_proj", "fc2"],
}
DEFAULT_FEEDFORWARD: dict[str, Targets] = {
    "llama": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"],
    "t5": ["wo"],
    "bart": ["fc2"],
}


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an IA3 adapter; field names and meanings follow HF PEFT."""

    peft_type: ClassVar[str] = "IA3"
    PEFT_DEFAULTS: ClassVar[dict[str, Any]] = {"exclude_modules": None}

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True
    modules_to_save: list[str] | None = None
    task_type: TaskType | str | None = None
    fan_in_fan_out: bool = field(default=False, repr=False)

    def validate(self) -> None:
        self.target_modules = normalize_targets("target_modules", self.target_modules)
        ff = self.feedforward_modules
        if isinstance(ff, (list, tuple, set, frozenset)) and len(ff) == 0:
            self.feedforward_modules = []  # explicitly none (None means the architecture's)
        else:
            self.feedforward_modules = normalize_targets("feedforward_modules", ff)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"feedforward_modules: {extra} are not in target_modules "
                    f"{self.target_modules}; feed-forward modules must be a subset of the targets"
                )
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights: must be True or False, got {self.init_ia3_weights!r}")
        self.modules_to_save = check_module_names("modules_to_save", self.modules_to_save)


class IA3Unit(AdapterUnit):
    """``ia3_l`` for one wrapped layer: shape (1, in) on feed-forward layers, (out, 1) else,
    as in HF PEFT."""

    mergeable = True

    def __init__(self, base_layer: nn.Module, config: IA3Config, feedforward: bool) -> None:
        super().__init__()
        in_features, out_features = linear_features(base_layer)
        self.is_feedforward = feedforward
        self.stage = "pre" if feedforward else "post"
        self.fan_in_fan_out = is_conv1d(base_layer)
        shape = (1, in_features) if feedforward else (out_features, 1)
        w = base_weight(base_layer)
        self.ia3_l = nn.Parameter(torch.empty(shape, **unit_placement(base_layer, w)))
        with torch.no_grad():
            if config.init_ia3_weights:
                nn.init.ones_(self.ia3_l)
            else:
                nn.init.normal_(self.ia3_l, mean=1.0, std=0.1)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.flatten().to(x.dtype)

    def post(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.ia3_l.flatten().to(y.dtype)

    @classmethod
    def routed(
        cls,
        stage: Stage,
        per_group: Sequence[Sequence[AdapterUnit]],
        index: torch.Tensor,
        t: torch.Tensor,
        cache: dict[Any, Any],
    ) -> torch.Tensor | None:
        """Per-sample IA3: one scale vector per group (a Stack's scales multiply, ones for
        groups without one), gathered per sample and multiplied in."""
        reuse = not torch.is_grad_enabled()
        key = ("gathered", index.shape[0], index.device, t.dtype)
        per_sample = cache.get(key) if reuse else None
        if per_sample is None:
            ones = t.new_ones(t.shape[-1])
            rows = []
            for group in per_group:
                scale = ones
                for unit in group:
                    assert isinstance(unit, IA3Unit)
                    scale = scale * unit.ia3_l.flatten().to(t.dtype)
                rows.append(scale)
            per_sample = torch.stack(rows)[index]  # (batch, features)
            if reuse:
                cache[key] = per_sample
        return t * per_sample.view(t.shape[0], *([1] * (t.dim() - 2)), t.shape[-1])

    def _weight_scale(self) -> torch.Tensor:
        """l shaped to broadcast against the base weight (Linear: (out, in); Conv1D: (in, out))."""
        v = self.ia3_l.flatten()
        along_in = self.is_feedforward
        if self.fan_in_fan_out:
            return v[:, None] if along_in else v[None, :]
        return v[None, :] if along_in else v[:, None]

    def merged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = base_weight(base_layer), base_bias(base_layer)
        scale = self._weight_scale().to(w.dtype)
        new_b = None if self.is_feedforward or b is None else b * self.ia3_l.flatten().to(b.dtype)
        return w * scale, new_b

    def unmerged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = base_weight(base_layer), base_bias(base_layer)
        scale = self._weight_scale().to(w.dtype)
        new_b = None if self.is_feedforward or b is None else b / self.ia3_l.flatten().to(b.dtype)
        return w / scale, new_b

    def check_unmergeable(self) -> str | None:
        smallest = float(self.ia3_l.detach().abs().min())
        if smallest < _MIN_INVERTIBLE:
            return (
                f"an IA3 scale is {smallest:.1e}, too close to zero to divide back out on "
                "unmerge; use merge_and_unload() if you do not need to unmerge"
            )
        return None


class IA3Method(Method):
    peft_type = "IA3"
    config_class = IA3Config
    name = "IA3"
    mergeable = True

    def targets(self, model: nn.Module, config: IA3Config) -> dict[str, Any]:
        arch = architecture_of(model) or ""
        names = resolve_targets(model, config.target_modules, DEFAULT_TARGETS.get(arch), method="IA3")
        ff_target = config.feedforward_modules
        if ff_target is None:
            # as in HF PEFT: the architecture's feed-forward modules, wherever they are targeted
            # (so the same config gives the same adapter shapes in both libraries)
            ff_target = DEFAULT_FEEDFORWARD.get(arch, [])
        ff_names = set(find_targets(model, ff_target, field="feedforward_modules")) if ff_target else set()
        if config.feedforward_modules is None:
            ff_names &= set(names)
        outside = sorted(ff_names - set(names))
        if outside:
            raise ValueError(
                f"feedforward_modules: {outside} are not among the target modules; "
                "feed-forward modules must be a subset of target_modules"
            )
        return {name: name in ff_names for name in names}

    def make_unit(self, base_layer: nn.Module, config: IA3Config, role: Any) -> AdapterUnit:
        return IA3Unit(base_layer, config, feedforward=bool(role))

    def check_combinable(
        self, module: str, first_name: str, name: str, first: AdapterUnit, unit: AdapterUnit
    ) -> None:
        assert isinstance(first, IA3Unit) and isinstance(unit, IA3Unit)
        if unit.is_feedforward != first.is_feedforward:
            raise ValueError(
                f"IA3 adapters {first_name!r} and {name!r} scale {module} differently (one its input as a "
                "feed-forward module, one its output); give them the same feedforward_modules"
            )

    def combined_config(
        self, host: AdapterHost, inputs: Inputs, firsts: dict[str, AdapterUnit]
    ) -> PeftConfig:
        """The first input's config when it reproduces the modules and roles, else one that lists them."""
        roles = {m: isinstance(u, IA3Unit) and u.is_feedforward for m, u in firsts.items()}
        config = combination.copy_config(host.peft_config[inputs[0][0]], modules_to_save=None)
        if self._reproduces(host, config, roles):
            return config
        ff = {m for m, is_ff in roles.items() if is_ff}
        config = combination.copy_config(
            config,
            target_modules=exact_suffixes(host.base_model, set(roles)),
            feedforward_modules=exact_suffixes(host.base_model, ff) if ff else [],
        )
        if not self._reproduces(host, config, roles):
            raise RuntimeError("internal error: no IA3 config reproduces the inputs' modules and roles")
        return config

    def _reproduces(self, host: AdapterHost, config: PeftConfig, roles: dict[str, bool]) -> bool:
        assert isinstance(config, IA3Config)
        try:
            return self.targets(host.base_model, config) == roles
        except ValueError:
            return False
