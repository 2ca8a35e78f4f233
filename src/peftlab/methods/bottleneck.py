"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2021,
arXiv:2005.00247).

A small two-layer network with its own residual connection acts on the output ``h`` of a
sub-block's output projection, before the block adds its residual stream:

    h <- h + W_up f(W_down h + b_down) + b_up,     W_down: b x d,  W_up: d x b,  b = d // reduction_factor

``mh_adapter`` places one after the attention output projection, ``output_adapter`` one
after the feed-forward output projection (Houlsby: both; Pfeiffer: the FFN one only). Each
adapter holds ``2 * (d*b + b + b*d + d)`` parameters per layer when both positions are on.

The module is wrapped through the framework every method shares (a ``post`` unit on the
projection, no copied forwards). Parameter names, which are also the checkpoint keys
(``base_model.model.<module path>.<name>`` in ``adapter_model.safetensors``, ``peft_type``
``"BOTTLENECK"``): ``adapter_down.weight`` (b, d), ``adapter_down.bias`` (b),
``adapter_up.weight`` (d, b), ``adapter_up.bias`` (d).

The non-linearity ``f`` makes the adapter no linear change of the wrapped weight, so it
cannot be merged. Weighted combination averages every parameter, ``p = sum_i w_i p_i``, of
adapters on the same modules with the same sizes and non-linearity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import PeftConfig, TaskType, check_positive_int, normalize_targets
from peftlab.core.layers import AdapterUnit, Stage, base_weight, linear_features
from peftlab.core.method import Method, Targets, architecture_of, resolve_targets
from peftlab.core.quantized import unit_placement

NON_LINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}
INIT_SCHEMES = ("bert", "houlsby", "zeros")
# mh_modules / output_modules = None: the attention block's output projection and the FFN's
# output projection, both before their residual add
DEFAULT_MH_MODULES: dict[str, Targets] = {
    "llama": ["o_proj"],
    "gpt2": ["attn.c_proj"],
    "bert": ["attention.output.dense"],
    "t5": ["SelfAttention.o", "EncDecAttention.o"],
    "bart": ["self_attn.out_proj", "encoder_attn.out_proj"],
}
DEFAULT_OUTPUT_MODULES: dict[str, Targets] = {
    "llama": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "bert": r".*\.layer\.\d+\.output\.dense",
    "t5": ["DenseReluDense.wo"],
    "bart": ["fc2"],
}
# std of the normal init: BERT's initializer range, and Houlsby's near-identity scale
_BERT_STD = 0.02
_HOULSBY_STD = 1e-2

UNMERGEABLE_REASON = (
    "a bottleneck adapter applies a non-linearity between its projections, so it is not a "
    "linear change of the wrapped weight and cannot be folded into it; keep it unmerged, or use "
    "LoRA or IA3 where zero inference overhead is needed"
)


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter; field names follow AdapterHub.

    ``mh_modules`` / ``output_modules`` (module-name suffixes or a regex, like LoRA's
    ``target_modules``) replace the architecture's default attention / FFN output
    projections, for custom models.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    mh_adapter: bool = True
    output_adapter: bool = True
    reduction_factor: int | float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    init_weights: str = "bert"
    task_type: TaskType | str | None = None
    mh_modules: list[str] | str | None = None
    output_modules: list[str] | str | None = None

    def validate(self) -> None:
        for name in ("mh_adapter", "output_adapter"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError(
                "mh_adapter/output_adapter: both are False, so the adapter would sit nowhere; "
                "set at least one of them True"
            )
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            raise ValueError(f"reduction_factor: must be a number > 0, got {rf!r}")
        if self.bottleneck_size is not None:
            check_positive_int("bottleneck_size", self.bottleneck_size)
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity: {self.non_linearity!r} is not supported; use one of "
                f"{', '.join(NON_LINEARITIES)}"
            )
        self.non_linearity = self.non_linearity.lower()
        if self.init_weights not in INIT_SCHEMES:
            raise ValueError(
                f"init_weights: {self.init_weights!r} is not supported; use 'bert' (N(0, 0.02) "
                "projections), 'houlsby' (near-identity, N(0, 0.01)) or 'zeros' (zero "
                "up-projection: exactly the base model at start)"
            )
        self.mh_modules = normalize_targets("mh_modules", self.mh_modules)
        self.output_modules = normalize_targets("output_modules", self.output_modules)
        for field_name, position in (("mh_modules", "mh_adapter"), ("output_modules", "output_adapter")):
            if getattr(self, field_name) is not None and not getattr(self, position):
                raise ValueError(
                    f"{field_name}: set while {position}=False, so it would be ignored; "
                    f"set {position}=True or drop {field_name}"
                )

    def bottleneck_for(self, d_model: int) -> int:
        """The bottleneck width for a projection of output size ``d_model``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        size = int(d_model // self.reduction_factor)
        if size < 1:
            raise ValueError(
                f"reduction_factor: {self.reduction_factor} leaves no bottleneck for d_model={d_model} "
                f"({d_model} // {self.reduction_factor} = 0); use a reduction_factor <= {d_model} "
                "or set bottleneck_size"
            )
        return size


AdapterConfig = BottleneckConfig


def HoulsbyConfig(**overrides: Any) -> BottleneckConfig:
    """Houlsby et al.'s placement: adapters after attention and after the FFN (AdapterHub's
    ``DoubleSeqBnConfig`` defaults: swish, reduction factor 16)."""
    fields: dict[str, Any] = {"mh_adapter": True, "output_adapter": True, "non_linearity": "swish"}
    return BottleneckConfig(**{**fields, **overrides})


def PfeifferConfig(**overrides: Any) -> BottleneckConfig:
    """Pfeiffer et al.'s placement: one adapter after the FFN only (AdapterHub's ``SeqBnConfig``
    defaults: relu, reduction factor 16)."""
    fields: dict[str, Any] = {"mh_adapter": False, "output_adapter": True, "non_linearity": "relu"}
    return BottleneckConfig(**{**fields, **overrides})


class BottleneckUnit(AdapterUnit):
    """``adapter_down`` / ``adapter_up`` for one wrapped output projection."""

    stage: Stage = "post"
    post_order = 1  # after linear output rescaling (IA3) on the same module
    mergeable = False
    unmergeable_reason = UNMERGEABLE_REASON

    def __init__(self, base_layer: nn.Module, config: BottleneckConfig) -> None:
        super().__init__()
        _, d_model = linear_features(base_layer)
        size = config.bottleneck_for(d_model)
        weight = base_weight(base_layer)
        kw = unit_placement(base_layer, weight)
        self.adapter_down = nn.Linear(d_model, size, **kw)
        self.adapter_up = nn.Linear(size, d_model, **kw)
        self.non_linearity = config.non_linearity
        self.reset_parameters(config.init_weights)

    def reset_parameters(self, init_weights: str) -> None:
        with torch.no_grad():
            std = _HOULSBY_STD if init_weights == "houlsby" else _BERT_STD
            nn.init.normal_(self.adapter_down.weight, std=std)
            nn.init.zeros_(self.adapter_down.bias)
            if init_weights == "zeros":
                nn.init.zeros_(self.adapter_up.weight)
            else:
                nn.init.normal_(self.adapter_up.weight, std=std)
            nn.init.zeros_(self.adapter_up.bias)

    def post(self, y: torch.Tensor) -> torch.Tensor:
        # F.linear on the parameters directly: decode runs this once per wrapped layer per
        # token, and skipping two nn.Module calls is most of the adapter's Python overhead
        down, up = self.adapter_down, self.adapter_up
        h = F.linear(y.to(down.weight.dtype), down.weight, down.bias)
        h = F.linear(NON_LINEARITIES[self.non_linearity](h), up.weight, up.bias)
        if h.dtype == y.dtype:
            # in place into a fresh tensor whose value no backward needs: saves an allocation
            return h.add_(y)
        return y + h.to(y.dtype)

    @classmethod
    def routed(
        cls,
        stage: Stage,
        per_group: Sequence[Sequence[AdapterUnit]],
        index: torch.Tensor,
        t: torch.Tensor,
        cache: dict[Any, Any],
    ) -> torch.Tensor | None:
        """Per-sample bottleneck adapters: at each depth of a Stack, every group's down/up
        projections (zero-padded to a common width) are gathered per sample and applied with
        bmm to the samples whose group has an adapter at that depth; the others pass through."""
        groups = [[u for u in g if isinstance(u, BottleneckUnit)] for g in per_group]
        reuse = not torch.is_grad_enabled()
        y = t
        for depth in range(max(len(g) for g in groups)):
            key = ("gathered", depth, index.shape[0], index.device)
            weights = cache.get(key) if reuse else None
            if weights is None:
                weights = _gathered([g[depth] if depth < len(g) else None for g in groups], index)
                if reuse:
                    cache[key] = weights
            y = _routed_step(weights, y)
        return y


_Gathered = tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    list[str],
    torch.Tensor | None,
    torch.Tensor | None,
]


def _gathered(units: list[BottleneckUnit | None], index: torch.Tensor) -> _Gathered:
    """Per-sample (down bias, down weight^T, up bias, up weight^T), the non-linearities in use,
    which one each sample takes when there are several, and which samples have an adapter at all
    (None: every one). Samples whose group has no adapter at this depth are left out: their
    output is their input, and no zero weights are stacked and multiplied for them."""
    present = [u for u in units if u is not None]
    ref = present[0].adapter_down
    d_model = ref.weight.shape[1]
    width = max(u.adapter_down.weight.shape[0] for u in present)
    down_w, down_b, up_w, up_b = [], [], [], []
    for unit in units:
        if unit is None:
            down_w.append(ref.weight.new_zeros(width, d_model))
            down_b.append(ref.weight.new_zeros(width))
            up_w.append(ref.weight.new_zeros(d_model, width))
            up_b.append(ref.weight.new_zeros(d_model))
            continue
        down, up = unit.adapter_down, unit.adapter_up
        pad = width - down.weight.shape[0]
        down_w.append(F.pad(down.weight, (0, 0, 0, pad)))
        down_b.append(F.pad(down.bias, (0, pad)))
        up_w.append(F.pad(up.weight, (0, pad)))
        up_b.append(up.bias)
    rows: torch.Tensor | None = None
    if len(present) < len(units):
        has = torch.tensor([u is not None for u in units], device=index.device)[index]
        if not bool(has.all()):
            rows = has.nonzero().squeeze(1)
    i = index if rows is None else index[rows]
    kinds = sorted({u.non_linearity for u in present})
    choice = None
    if len(kinds) > 1:
        choice = torch.tensor(
            [kinds.index(u.non_linearity) if u is not None else 0 for u in units], device=i.device
        )[i]
    return (
        torch.stack(down_b)[i].unsqueeze(1),
        torch.stack(down_w)[i].transpose(1, 2),
        torch.stack(up_b)[i].unsqueeze(1),
        torch.stack(up_w)[i].transpose(1, 2),
        kinds,
        choice,
        rows,
    )


def _routed_step(weights: _Gathered, y: torch.Tensor) -> torch.Tensor:
    down_b, down_w, up_b, up_w, kinds, choice, rows = weights
    flat = y.reshape(y.shape[0], -1, down_w.shape[1])
    x = (flat if rows is None else flat[rows]).to(down_w.dtype)
    z = torch.baddbmm(down_b, x, down_w)
    if choice is None:
        act = NON_LINEARITIES[kinds[0]](z)
    else:
        # different non-linearities per group: each sample takes its own (f(0) = 0 for all)
        act = torch.zeros_like(z)
        for k, kind in enumerate(kinds):
            act = torch.where((choice == k).view(-1, 1, 1), NON_LINEARITIES[kind](z), act)
    h = torch.baddbmm(up_b, act, up_w).to(y.dtype)
    if rows is None:
        return y + h.reshape(y.shape)
    return flat.index_add(0, rows, h).reshape(y.shape)


class BottleneckMethod(Method):
    peft_type = "BOTTLENECK"
    config_class = BottleneckConfig
    name = "bottleneck"
    mergeable = False
    unmergeable_reason = UNMERGEABLE_REASON

    def targets(self, model: nn.Module, config: BottleneckConfig) -> dict[str, Any]:
        """Attention output projections (role ``"mh"``) and FFN output projections (``"output"``)."""
        arch = architecture_of(model) or ""
        positions = (
            ("mh", config.mh_adapter, config.mh_modules, DEFAULT_MH_MODULES.get(arch)),
            ("output", config.output_adapter, config.output_modules, DEFAULT_OUTPUT_MODULES.get(arch)),
        )
        roles: dict[str, str] = {}
        for role, enabled, configured, default in positions:
            if not enabled:
                continue
            field_name = f"{role}_modules"
            for name in resolve_targets(model, configured, default, method="bottleneck", field=field_name):
                if name in roles:
                    raise ValueError(
                        f"mh_modules/output_modules: {name} is selected by both; one module holds one "
                        "adapter per name, so make the two selections disjoint"
                    )
                roles[name] = role
        return roles

    def make_unit(self, base_layer: nn.Module, config: BottleneckConfig, role: Any) -> AdapterUnit:
        return BottleneckUnit(base_layer, config)

    def check_combinable(
        self, module: str, first_name: str, name: str, first: AdapterUnit, unit: AdapterUnit
    ) -> None:
        assert isinstance(first, BottleneckUnit) and isinstance(unit, BottleneckUnit)
        size, first_size = unit.adapter_down.weight.shape[0], first.adapter_down.weight.shape[0]
        if size != first_size:
            raise ValueError(
                f"bottleneck adapters {first_name!r} and {name!r} differ in shape at {module} (bottleneck "
                f"size {first_size} vs {size}); a weighted average needs same-shaped adapters: give them the "
                "same bottleneck_size / reduction_factor"
            )
        if unit.non_linearity != first.non_linearity:
            raise ValueError(
                f"bottleneck adapters {first_name!r} and {name!r} use different non-linearities "
                f"({first.non_linearity} vs {unit.non_linearity}); average adapters of one non_linearity"
            )
