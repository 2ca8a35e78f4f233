"""Weighted combinations of existing adapters (``PeftModel.add_weighted_adapter``).

The new adapter has the inputs' method and is computed once from their current parameters
with weights ``w_i`` (not normalised: weights summing to 1 give an average; negative weights
subtract, as in task arithmetic). What each ``combination_type`` computes:

LoRA (adapter ``i``: ``A_i`` (r_i x in), ``B_i`` (out x r_i), scaling ``s_i``; the new adapter
has ``lora_alpha = r``, so its own scaling is 1 and its delta is ``B A``):

- ``"cat"``: ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1 ... B_n]``, rank ``sum r_i``.
  Exact: ``B A = sum_i w_i s_i B_i A_i``. Same parameters as HF PEFT's ``"cat"``.
- ``"svd"``: per module the best rank-``k`` approximation (Eckart-Young) of that exact sum,
  ``B = U_k S_k``, ``A = V_k^T``; ``k = svd_rank`` (default: the largest ``r_i``). The SVD is
  taken of the small factor matrices (QR of the concatenated ``B`` and ``A``), never of the
  dense out x in delta. Where a module's delta has fewer than ``k`` singular values the
  remaining rank is zero. Same delta as HF PEFT's ``"svd"``.
- ``"linear"``: HF PEFT's rule, for adapters of one rank ``r``:
  ``A = sum_i sign(w_i) sqrt(|w_i| s_i) A_i``, ``B = sum_i sqrt(|w_i| s_i) B_i``, rank ``r``.
  ``A`` and ``B`` are combined separately, so ``B A`` holds cross terms ``B_i A_j``: it equals
  the weighted delta sum only for one adapter. Cheap and approximate; prefer ``"cat"``/``"svd"``.

A module that only some LoRA inputs adapt takes only their terms (the others contribute
zero); the new adapter targets the union of the inputs' modules.

IA3: ``l = sum_i w_i l_i`` (the inputs must scale the same modules, in the same roles).
Bottleneck: every parameter ``p = sum_i w_i p_i`` (same modules, sizes and non-linearity).
Prefix tuning: ``P = sum_i w_i P_i`` of the plain prefix vectors (a projected prefix is
folded to its vectors first; the result has no projection).

Bias and ``modules_to_save``: LoRA's trainable biases are the base model's own, so nothing
is combined and the new adapter has ``bias="none"``; adapters with ``modules_to_save``
copies (whole trained modules, e.g. a classification head) are refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from peftlab.config import PeftConfig
from peftlab.injection import saved_modules, wrapped_modules
from peftlab.layers import AdapterUnit
from peftlab.methods import get_method
from peftlab.methods.bottleneck import BottleneckUnit
from peftlab.methods.ia3 import IA3Unit
from peftlab.methods.lora import LoraConfig, LoraUnit
from peftlab.methods.prefix import PrefixEncoder

if TYPE_CHECKING:
    from peftlab.peft_model import PeftModel

COMBINATION_TYPES: dict[str, tuple[str, ...]] = {
    "LORA": ("linear", "cat", "svd"),
    "IA3": ("linear",),
    "BOTTLENECK": ("linear",),
    "PREFIX_TUNING": ("linear",),
}
# HF PEFT's options that peftlab does not implement, named in the error instead of "unknown"
_PEFT_ONLY_OPTIONS = ("svd_clamp", "svd_full_matrices", "svd_driver", "density", "majority_sign_method")

Values = dict[str, torch.Tensor]  # the new adapter's parameter path (in the PeftModel) -> value
Inputs = list[tuple[str, float]]  # (adapter name, weight)


def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
    **kwargs: Any,
) -> None:
    """Add ``adapter_name``, a weighted combination of ``adapters`` (see the module docstring
    for what each ``combination_type`` computes), inactive like ``add_adapter``.

    Options: ``svd_rank`` (``combination_type="svd"`` only). Everything is checked and
    computed before the adapter is added, and a failure leaves the model unchanged.
    """
    from peftlab.peft_model import _check_name

    names = _check_adapters(model, adapters)
    ws = _check_weights(weights, len(names))
    _check_name(adapter_name)
    if adapter_name in model.peft_config:
        raise ValueError(
            f"adapter {adapter_name!r} exists already; pick another adapter_name or "
            f"delete_adapter({adapter_name!r}) first"
        )
    peft_type = _common_method(model, names)
    allowed = COMBINATION_TYPES.get(peft_type, ())
    if combination_type not in allowed:
        raise ValueError(
            f"combination_type {combination_type!r} is not available for {peft_type} adapters; "
            f"use one of {', '.join(repr(c) for c in allowed) or 'none (not supported)'}"
        )
    svd_rank = _check_options(kwargs, combination_type)
    _refuse_modules_to_save(model, names)
    _check_finite_inputs(model, names)

    inputs = list(zip(names, ws, strict=True))
    combine: Callable[..., tuple[PeftConfig, Values]] = {
        "LORA": _combine_lora,
        "IA3": _combine_ia3,
        "BOTTLENECK": _combine_bottleneck,
        "PREFIX_TUNING": _combine_prefix,
    }[peft_type]
    with torch.no_grad():
        config, values = combine(
            model, inputs, adapter_name, combination_type=combination_type, svd_rank=svd_rank
        )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.add_adapter(adapter_name, config)
    try:
        params = model.adapter_parameters(adapter_name)
        if set(params) != set(values):
            missing = sorted(set(params) ^ set(values))[:3]
            raise RuntimeError(
                f"internal error: combined parameters do not match the new adapter's: {missing}"
            )
        with torch.no_grad():
            for path, value in values.items():
                param = params[path]
                if param.shape != value.shape:
                    raise RuntimeError(
                        f"internal error: {path} has shape {tuple(param.shape)}, "
                        f"combined {tuple(value.shape)}"
                    )
                cast = value.to(device=param.device, dtype=param.dtype)
                if not torch.isfinite(cast).all():
                    raise ValueError(
                        f"the combination overflows {param.dtype} ({path} is not finite); use smaller weights"
                    )
                param.copy_(cast)
    except BaseException:
        model.delete_adapter(adapter_name)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


# ---- checks ------------------------------------------------------------------------------
def _check_adapters(model: PeftModel, adapters: Sequence[str]) -> list[str]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise ValueError(f"adapters must be a list of adapter names, e.g. ['a', 'b'], got {adapters!r}")
    names = list(adapters)
    if not names:
        raise ValueError("adapters is empty; name at least one adapter to combine")
    for name in names:
        if not isinstance(name, str) or name not in model.peft_config:
            raise ValueError(
                f"no adapter named {name!r} to combine; this model has {sorted(model.peft_config) or 'none'}"
            )
    return names


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a list of numbers, one per adapter, got {weights!r}")
    if len(weights) != count:
        raise ValueError(
            f"weights has {len(weights)} entries but adapters has {count}; give one weight per adapter"
        )
    out: list[float] = []
    for w in weights:
        scalar = isinstance(w, torch.Tensor) and w.numel() == 1
        if isinstance(w, bool) or not (isinstance(w, numbers.Real) or scalar):
            raise ValueError(f"weights: {w!r} is not a number; give one real weight per adapter")
        value = float(w)
        if not math.isfinite(value):
            raise ValueError(f"weights: {value} is not finite; give finite weights")
        out.append(value)
    return out


def _common_method(model: PeftModel, names: list[str]) -> str:
    types = {name: model.peft_config[name].peft_type for name in names}
    if len(set(types.values())) > 1:
        listed = ", ".join(f"{n!r} ({t})" for n, t in types.items())
        raise ValueError(
            f"adapters of different methods cannot be combined: {listed}; combine adapters of one "
            "method, or activate them together with set_adapter([...]) instead"
        )
    return types[names[0]]


def _check_options(kwargs: dict[str, Any], combination_type: str) -> int | None:
    unknown = sorted(set(kwargs) - {"svd_rank"})
    if unknown:
        peft_only = [k for k in unknown if k in _PEFT_ONLY_OPTIONS]
        raise TypeError(
            f"add_weighted_adapter() got unsupported options {unknown}"
            + (" (HF PEFT options peftlab does not implement)" if peft_only else "")
            + "; the only option is svd_rank (with combination_type='svd')"
        )
    svd_rank = kwargs.get("svd_rank")
    if svd_rank is None:
        return None
    if combination_type != "svd":
        raise ValueError(
            f"svd_rank applies to combination_type='svd' only, not {combination_type!r}; drop it or use 'svd'"
        )
    if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
        raise ValueError(f"svd_rank: must be a positive integer (the new adapter's rank), got {svd_rank!r}")
    return svd_rank


def _refuse_modules_to_save(model: PeftModel, names: list[str]) -> None:
    for name in names:
        held = [path for path, saved in saved_modules(model.base_model) if name in saved.modules_to_save]
        if held or getattr(model.peft_config[name], "modules_to_save", None):
            where = f": {', '.join(held)}" if held else ""
            raise ValueError(
                f"adapter {name!r} trains whole modules (modules_to_save{where}); "
                "add_weighted_adapter does not support modules_to_save, since there is no weighted rule for "
                "a fully trained module: combine adapters without it"
            )


def _check_finite_inputs(model: PeftModel, names: list[str]) -> None:
    for name in dict.fromkeys(names):
        for path, p in model.adapter_parameters(name).items():
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"adapter {name!r} has NaN/inf parameters ({path}); a combination would carry them over"
                )


def _units(model: PeftModel, inputs: Inputs) -> dict[str, list[tuple[AdapterUnit, float]]]:
    """Per wrapped module, the (unit, weight) of every input adapter it holds, in input order."""
    found: dict[str, list[tuple[AdapterUnit, float]]] = {}
    for module_name, wrapper in wrapped_modules(model.base_model):
        here = [(wrapper.adapters[n], w) for n, w in inputs if n in wrapper.adapters]
        if here:
            found[module_name] = [(u, w) for u, w in here if isinstance(u, AdapterUnit)]
    return found


def _modules_of(model: PeftModel, name: str) -> set[str]:
    return {m for m, w in wrapped_modules(model.base_model) if name in w.adapters}


def _same_modules(model: PeftModel, inputs: Inputs, what: str) -> None:
    first = inputs[0][0]
    expected = _modules_of(model, first)
    for name, _ in inputs[1:]:
        got = _modules_of(model, name)
        if got != expected:
            differ = sorted(got ^ expected)[:3]
            raise ValueError(
                f"{what} adapters {first!r} and {name!r} sit on different modules (e.g. {differ}); "
                f"a weighted {what} combination needs adapters on the same modules: give them the "
                "same target modules"
            )


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 for the arithmetic (float32 on MPS, which has no float64)."""
    return t.detach().to(torch.float32 if t.device.type == "mps" else torch.float64)


def _unit_path(module_name: str, adapter_name: str, param: str) -> str:
    return f"base_model.{module_name}.adapters.{adapter_name}.{param}"


def _copy_config(config: PeftConfig, **changes: Any) -> PeftConfig:
    """A deep copy of ``config`` (through its dict form, so lists are not shared) with changes."""
    return type(config).from_dict({**config.to_dict(), **changes})


def _selected(model: PeftModel, config: PeftConfig) -> dict[str, Any] | None:
    """The modules ``config`` would adapt, with their roles (None if it selects none)."""
    try:
        return get_method(config.peft_type).targets(model.base_model, config)
    except ValueError:
        return None


def _check_targets(model: PeftModel, config: PeftConfig, expected: dict[str, Any]) -> bool:
    """Whether ``config`` adapts exactly the modules in ``expected``, in the same roles."""
    return _selected(model, config) == expected


# ---- LoRA --------------------------------------------------------------------------------
def _combine_lora(
    model: PeftModel, inputs: Inputs, adapter_name: str, *, combination_type: str, svd_rank: int | None
) -> tuple[PeftConfig, Values]:
    configs = [model.peft_config[n] for n, _ in inputs]
    assert all(isinstance(c, LoraConfig) for c in configs)
    ranks = [c.r for c in configs]  # type: ignore[attr-defined]
    if combination_type == "linear":
        if len(set(ranks)) > 1:
            listed = ", ".join(f"r={r} ({n!r})" for (n, _), r in zip(inputs, ranks, strict=True))
            raise ValueError(
                f"combination_type='linear' needs adapters of one rank, got {listed}; use 'cat' (exact, "
                f"rank {sum(ranks)}) or 'svd' (a rank-{max(ranks)} approximation) instead"
            )
        rank = ranks[0]
    elif combination_type == "cat":
        rank = sum(ranks)
    else:
        rank = svd_rank if svd_rank is not None else max(ranks)

    per_module = _units(model, inputs)
    values: Values = {}
    for module_name, units in per_module.items():
        terms = [(u, w) for u, w in units if isinstance(u, LoraUnit)]
        if combination_type == "linear":
            a, b = _lora_linear(terms)
        else:
            a, b = _lora_concat(terms)
            if combination_type == "svd":
                a, b = _truncated_svd(a, b, rank)
            a, b = _pad_rank(a, b, rank)
        values[_unit_path(module_name, adapter_name, "lora_A.weight")] = a
        values[_unit_path(module_name, adapter_name, "lora_B.weight")] = b

    first = configs[0]
    assert isinstance(first, LoraConfig)
    base = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the weights and scalings are folded into A and B
        lora_dropout=first.lora_dropout,
        target_modules=first.target_modules,
        layers_to_transform=first.layers_to_transform,
        task_type=_common_task_type(model, [n for n, _ in inputs]),
        fan_in_fan_out=first.fan_in_fan_out,
    )
    return _union_targets(model, base, configs, set(per_module)), values


def _lora_concat(terms: list[tuple[LoraUnit, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) stacked along the rank, each A scaled by its ``w_i s_i``: B A is the exact sum."""
    a = torch.cat([_wide(u.lora_A.weight) * (w * u.scaling) for u, w in terms], 0)
    b = torch.cat([_wide(u.lora_B.weight) for u, _ in terms], 1)
    return a, b


def _lora_linear(terms: list[tuple[LoraUnit, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF PEFT's "linear": A and B summed separately, each with sqrt(|w_i| s_i), the sign on A."""
    a = b = None
    for u, w in terms:
        root = math.sqrt(abs(w) * u.scaling)
        term_a = math.copysign(root, w) * _wide(u.lora_A.weight)
        term_b = root * _wide(u.lora_B.weight)
        a = term_a if a is None else a + term_a
        b = term_b if b is None else b + term_b
    assert a is not None and b is not None
    return a, b


def _truncated_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``B A`` through QR of the thin factors: with
    ``B = Q_b R_b`` and ``A^T = Q_a R_a``, ``B A = Q_b (R_b R_a^T) Q_a^T``, so the SVD of the
    small ``R_b R_a^T`` gives that of ``B A``."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, s.numel())
    return vh[:k] @ q_a.T, (q_b @ u[:, :k]) * s[:k]


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rank components up to ``rank`` (modules with fewer inputs, or a thin SVD)."""
    missing = rank - a.shape[0]
    if missing > 0:
        a = torch.cat([a, a.new_zeros(missing, a.shape[1])], 0)
        b = torch.cat([b, b.new_zeros(b.shape[0], missing)], 1)
    return a, b


def _common_task_type(model: PeftModel, names: list[str]) -> Any:
    found = {getattr(model.peft_config[n], "task_type", None) for n in names} - {None}
    if len(found) > 1:
        raise ValueError(
            f"adapters {names} were made for different task types {sorted(str(t) for t in found)}; "
            "combine adapters of one task"
        )
    return next(iter(found), None)


def _union_targets(
    model: PeftModel, base: LoraConfig, configs: list[PeftConfig], modules: set[str]
) -> LoraConfig:
    """``base`` targeting exactly ``modules``: the inputs' own target spec when they share one,
    else the shortest module-name suffixes that select the union (as checkpoints write them)."""
    from peftlab.checkpoint import exact_suffixes

    expected = dict.fromkeys(modules)
    specs = {(repr(c.target_modules), repr(c.layers_to_transform)) for c in configs}  # type: ignore[attr-defined]
    if len(specs) == 1 and _check_targets(model, base, expected):
        return base
    union = _copy_config(
        base, target_modules=exact_suffixes(model.base_model, modules), layers_to_transform=None
    )
    assert isinstance(union, LoraConfig)
    if not _check_targets(model, union, expected):
        raise RuntimeError(f"internal error: no target_modules selects exactly {sorted(modules)[:3]}...")
    return union


# ---- IA3 and bottleneck: parameter-wise weighted sums ------------------------------------------
def _weighted_unit_sums(
    model: PeftModel,
    inputs: Inputs,
    adapter_name: str,
    check: Callable[[str, str, AdapterUnit, AdapterUnit], None],
) -> tuple[Values, dict[str, Any]]:
    """``sum_i w_i p_i`` for every parameter of every unit, after ``check(module, input name,
    first unit, unit)``; also the module -> role map the new config must reproduce."""
    values: Values = {}
    roles: dict[str, Any] = {}
    first_name = inputs[0][0]
    for module_name, wrapper in wrapped_modules(model.base_model):
        if first_name not in wrapper.adapters:
            continue
        first = wrapper.adapters[first_name]
        assert isinstance(first, AdapterUnit)
        sums: dict[str, torch.Tensor] = {}
        for name, w in inputs:
            unit = wrapper.adapters[name]
            assert isinstance(unit, AdapterUnit)
            check(module_name, name, first, unit)
            for pname, p in unit.named_parameters():
                term = _wide(p) * w
                sums[pname] = sums[pname] + term if pname in sums else term
        for pname, value in sums.items():
            values[_unit_path(module_name, adapter_name, pname)] = value
        roles[module_name] = first.is_feedforward if isinstance(first, IA3Unit) else None
    return values, roles


def _combine_ia3(model: PeftModel, inputs: Inputs, adapter_name: str, **_: Any) -> tuple[PeftConfig, Values]:
    _same_modules(model, inputs, "IA3")

    def check(module: str, name: str, first: AdapterUnit, unit: AdapterUnit) -> None:
        assert isinstance(first, IA3Unit) and isinstance(unit, IA3Unit)
        if unit.is_feedforward != first.is_feedforward:
            raise ValueError(
                f"IA3 adapters {inputs[0][0]!r} and {name!r} scale {module} differently (one its input as a "
                "feed-forward module, one its output); give them the same feedforward_modules"
            )

    values, roles = _weighted_unit_sums(model, inputs, adapter_name, check)
    first = model.peft_config[inputs[0][0]]
    config = _copy_config(first, modules_to_save=None)
    if not _check_targets(model, config, roles):
        from peftlab.checkpoint import exact_suffixes

        ff = {m for m, is_ff in roles.items() if is_ff}
        config = _copy_config(
            config,
            target_modules=exact_suffixes(model.base_model, set(roles)),
            feedforward_modules=exact_suffixes(model.base_model, ff) if ff else [],
        )
        if not _check_targets(model, config, roles):
            raise RuntimeError("internal error: no IA3 config reproduces the inputs' modules and roles")
    return config, values


def _combine_bottleneck(
    model: PeftModel, inputs: Inputs, adapter_name: str, **_: Any
) -> tuple[PeftConfig, Values]:
    _same_modules(model, inputs, "bottleneck")

    def check(module: str, name: str, first: AdapterUnit, unit: AdapterUnit) -> None:
        assert isinstance(first, BottleneckUnit) and isinstance(unit, BottleneckUnit)
        size, first_size = unit.adapter_down.weight.shape[0], first.adapter_down.weight.shape[0]
        if size != first_size:
            raise ValueError(
                f"bottleneck adapters {inputs[0][0]!r} and {name!r} differ in shape at {module} (bottleneck "
                f"size {first_size} vs {size}); a weighted average needs same-shaped adapters: give them the "
                "same bottleneck_size / reduction_factor"
            )
        if unit.non_linearity != first.non_linearity:
            raise ValueError(
                f"bottleneck adapters {inputs[0][0]!r} and {name!r} use different non-linearities "
                f"({first.non_linearity} vs {unit.non_linearity}); average adapters of one non_linearity"
            )

    values, roles = _weighted_unit_sums(model, inputs, adapter_name, check)
    first = model.peft_config[inputs[0][0]]
    config = _copy_config(first)
    # a bottleneck unit acts the same at either position, so only the module set must agree
    if set(_selected(model, config) or {}) != set(roles):
        raise RuntimeError("internal error: the first adapter's config no longer selects its modules")
    return config, values


# ---- prefix tuning ---------------------------------------------------------------------------
_PREFIX_LAYOUT = (
    "task_type",
    "num_virtual_tokens",
    "encoder_prefix",
    "cross_prefix",
    "num_transformer_submodules",
)


def _combine_prefix(
    model: PeftModel, inputs: Inputs, adapter_name: str, **_: Any
) -> tuple[PeftConfig, Values]:
    first_name = inputs[0][0]
    first_config = model.peft_config[first_name]
    total: torch.Tensor | None = None
    for name, w in inputs:
        config = model.peft_config[name]
        for field in _PREFIX_LAYOUT:
            mine, theirs = getattr(config, field), getattr(first_config, field)
            if mine != theirs:
                raise ValueError(
                    f"prefix adapters {first_name!r} and {name!r} differ in {field} ({theirs} vs {mine}); a "
                    "weighted average needs same-shaped prefixes: give them the same " + field
                )
        encoder = model.model_adapters[name]
        assert isinstance(encoder, PrefixEncoder)
        # the plain vectors: a projection MLP is folded, not averaged (its mean is no prefix's MLP)
        term = _wide(encoder.prefix_vectors()) * w
        if total is not None and term.shape != total.shape:
            raise ValueError(
                f"prefix adapters {first_name!r} and {name!r} have prefixes of shapes "
                f"{tuple(total.shape)} and {tuple(term.shape)}; a weighted average needs same-shaped "
                "prefixes (the same model layout)"
            )
        total = term if total is None else total + term
    assert total is not None
    config = _copy_config(first_config, prefix_projection=False, modules_to_save=None)
    return config, {f"model_adapters.{adapter_name}.embedding.weight": total}


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]
