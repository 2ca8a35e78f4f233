"""Weighted combinations of existing adapters (``PeftModel.add_weighted_adapter``): the checks
every method shares and the building blocks of the methods' own combination rules.

The new adapter has the inputs' method and is computed once from their current parameters
with weights ``w_i`` (not normalised: weights summing to 1 give an average; negative weights
subtract, as in task arithmetic). Each method says what a ``combination_type`` computes for it
(:meth:`peftlab.core.method.Method.combine`; LoRA's ``"linear"`` / ``"cat"`` / ``"svd"`` and
TIES / DARE / magnitude-pruning types are documented in :mod:`peftlab.methods.lora`). The
default, for a method whose adapter is a set of units on modules, is the parameter-wise weighted
sum ``p = sum_i w_i p_i`` over inputs on the same modules with same-shaped units.

Adapters with ``modules_to_save`` copies (whole trained modules, e.g. a classification head)
are refused: there is no weighted rule for a fully trained module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch

from peftlab.core.config import PeftConfig
from peftlab.core.host import AdapterHost
from peftlab.core.injection import saved_modules, wrapped_modules
from peftlab.core.layers import AdapterUnit

# Task-arithmetic rules on same-shaped tensors (TIES: Yadav et al., 2023, arXiv:2306.01708; DARE:
# Yu et al., 2023, arXiv:2311.03099): how each input is pruned first, and whether the merge elects
# a sign per entry (TIES) or sums (task arithmetic). The semantics are HF PEFT's (merge_utils).
PRUNING: dict[str, str | None] = {
    "linear": None,
    "ties": "magnitude",
    "magnitude_prune": "magnitude",
    "dare_linear": "random",
    "dare_ties": "random",
}
ELECTS_SIGN = ("ties", "dare_ties")
SIGN_METHODS = ("total", "frequency")

Values = dict[str, torch.Tensor]  # the new adapter's parameter path (in the model) -> value
# the values, or a function computing them once the new adapter exists: its units' initialisation
# draws from torch's RNG first, then the combination's own draws (DARE), as in HF PEFT
Computed = Values | Callable[[], Values]
Inputs = list[tuple[str, float]]  # (adapter name, weight)
UnitCheck = Callable[[str, str, str, AdapterUnit, AdapterUnit], None]


class Combiner(Protocol):
    """What :func:`combine` needs of a method (see :class:`peftlab.core.method.Method`)."""

    peft_type: ClassVar[str]
    combination_types: ClassVar[tuple[str, ...]]
    combination_options: ClassVar[dict[str, tuple[str, ...]]]

    def combine(
        self, host: AdapterHost, inputs: Inputs, adapter_name: str, combination_type: str, **options: Any
    ) -> tuple[PeftConfig, Computed]: ...


def combine(
    host: AdapterHost,
    method: Combiner,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
    options: dict[str, Any],
) -> tuple[PeftConfig, Computed]:
    """The new adapter's config and parameter values (or the function computing them once the
    adapter exists: see :data:`Computed`); everything is checked first."""
    names = check_adapters(host, adapters)
    ws = check_weights(weights, len(names))
    allowed = method.combination_types
    if combination_type not in allowed:
        raise ValueError(
            f"combination_type {combination_type!r} is not available for {method.peft_type} adapters; "
            f"use one of {', '.join(repr(c) for c in allowed) or 'none (not supported)'}"
        )
    checked = check_options(method, options, combination_type)
    refuse_modules_to_save(host, names)
    check_finite_inputs(host, names)
    with torch.no_grad():
        config, values = method.combine(
            host, list(zip(names, ws, strict=True)), adapter_name, combination_type, **checked
        )
    if not callable(values):
        return config, values
    compute = values

    def deferred() -> Values:
        with torch.no_grad():
            return compute()

    return config, deferred


# ---- checks ------------------------------------------------------------------------------
def check_adapters(host: AdapterHost, adapters: Sequence[str]) -> list[str]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise ValueError(f"adapters must be a list of adapter names, e.g. ['a', 'b'], got {adapters!r}")
    names = list(adapters)
    if not names:
        raise ValueError("adapters is empty; name at least one adapter to combine")
    for name in names:
        if not isinstance(name, str) or name not in host.peft_config:
            raise ValueError(
                f"no adapter named {name!r} to combine; this model has {sorted(host.peft_config) or 'none'}"
            )
    return names


def common_peft_type(host: AdapterHost, adapters: Sequence[str]) -> str:
    """The one method of the named adapters (an error naming each one's when they differ)."""
    names = check_adapters(host, adapters)
    types = {name: host.peft_config[name].peft_type for name in names}
    if len(set(types.values())) > 1:
        listed = ", ".join(f"{n!r} ({t})" for n, t in types.items())
        raise ValueError(
            f"adapters of different methods cannot be combined: {listed}; combine adapters of one "
            "method, or activate them together with set_adapter([...]) instead"
        )
    return types[names[0]]


def check_weights(weights: Sequence[float], count: int) -> list[float]:
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


def check_options(method: Combiner, options: dict[str, Any], combination_type: str) -> dict[str, Any]:
    """The options given (None values dropped), each known to the method and meant for this type."""
    known = method.combination_options
    unknown = sorted(set(options) - set(known))
    if unknown:
        offered = [f"{k} (with {_types(t)})" for k, t in known.items()]
        raise TypeError(
            f"add_weighted_adapter() got unsupported options {unknown}"
            + (
                f"; the only option is {offered[0]}"
                if len(offered) == 1
                else f"; the options are {', '.join(offered)}"
                if offered
                else f"; {method.peft_type} combinations take no options"
            )
        )
    checked = {k: v for k, v in options.items() if v is not None}
    for key in checked:
        if combination_type not in known[key]:
            raise ValueError(
                f"{key} applies to {_types(known[key])} only, not {combination_type!r}; drop it"
                + (" or use that type" if len(known[key]) == 1 else " or use one of those types")
            )
    return checked


def check_density(density: Any, combination_type: str) -> float:
    """``density`` (the fraction of entries each input keeps): a number in (0, 1]."""
    if density is None:
        raise ValueError(
            f"combination_type={combination_type!r} needs density, the fraction of entries kept; "
            "pass e.g. density=0.5 (a number in (0, 1])"
        )
    scalar = isinstance(density, torch.Tensor) and density.numel() == 1
    if isinstance(density, bool) or not (isinstance(density, numbers.Real) or scalar):
        raise ValueError(f"density: {density!r} is not a number; pass a fraction in (0, 1], e.g. 0.5")
    value = float(density)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"density: {value} is outside (0, 1]; pass the fraction of entries kept, e.g. 0.5")
    return value


def check_sign_method(method: Any) -> str:
    if method not in SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method: unknown {method!r}; use 'total' (sign of the summed values) or "
            "'frequency' (the more frequent sign)"
        )
    return str(method)


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """The 0/1 mask of ``t``'s ``int(density * numel)`` largest magnitudes."""
    flat = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    flat[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return flat.reshape(t.shape)


def merge_tensors(
    rule: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float = 1.0,
    sign_method: str = "total",
    random_mask: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One tensor from same-shaped ``tensors`` by ``rule`` (a key of :data:`PRUNING`), HF PEFT's
    semantics. Each input is pruned first unless ``density`` is 1: ``"magnitude"`` keeps its
    ``int(density * numel)`` largest magnitudes; ``"random"`` (DARE) keeps entries where
    ``random_mask(i)`` (a Bernoulli(density) 0/1 draw for input ``i``, called in input order) is 1
    and divides them by ``density``. Then ``ELECTS_SIGN`` rules elect a sign per entry from the
    pruned, unweighted inputs (``"total"``: the sign of their sum, ``"frequency"``: the more
    frequent sign; ties go to +) and average the weighted entries of that sign (zero where none
    is); the others sum the weighted inputs."""
    pruning = PRUNING[rule]
    kept: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        if pruning is None or density >= 1.0:
            kept.append(t)
        elif pruning == "magnitude":
            kept.append(t * magnitude_mask(t, density))
        else:
            assert random_mask is not None
            kept.append(t * random_mask(i) / density)
    stacked = torch.stack(kept)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.reshape(-1, *([1] * (stacked.dim() - 1)))
    if rule not in ELECTS_SIGN:
        return weighted.sum(0)
    signs = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _types(types: tuple[str, ...]) -> str:
    if len(types) == 1:
        return f"combination_type={types[0]!r}"
    return f"combination_type {' / '.join(map(repr, types))}"


def refuse_modules_to_save(host: AdapterHost, names: list[str]) -> None:
    for name in names:
        held = [path for path, saved in saved_modules(host.base_model) if name in saved.modules_to_save]
        if held or getattr(host.peft_config[name], "modules_to_save", None):
            where = f": {', '.join(held)}" if held else ""
            raise ValueError(
                f"adapter {name!r} trains whole modules (modules_to_save{where}); "
                "add_weighted_adapter does not support modules_to_save, since there is no weighted rule for "
                "a fully trained module: combine adapters without it"
            )


def check_finite_inputs(host: AdapterHost, names: list[str]) -> None:
    for name in dict.fromkeys(names):
        for path, p in host.adapter_parameters(name).items():
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"adapter {name!r} has NaN/inf parameters ({path}); a combination would carry them over"
                )


# ---- building blocks of the methods' rules --------------------------------------------------
def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 for the arithmetic (float32 on MPS, which has no float64)."""
    return t.detach().to(torch.float32 if t.device.type == "mps" else torch.float64)


def unit_path(module_name: str, adapter_name: str, param: str) -> str:
    """Where parameter ``param`` of ``adapter_name``'s unit at ``module_name`` lives in the model."""
    return f"base_model.{module_name}.adapters.{adapter_name}.{param}"


def copy_config(config: PeftConfig, **changes: Any) -> PeftConfig:
    """A deep copy of ``config`` (through its dict form, so lists are not shared) with changes."""
    return type(config).from_dict({**config.to_dict(), **changes})


def units_by_module(host: AdapterHost, inputs: Inputs) -> dict[str, list[tuple[AdapterUnit, float]]]:
    """Per wrapped module, the (unit, weight) of every input adapter it holds, in input order."""
    found: dict[str, list[tuple[AdapterUnit, float]]] = {}
    for module_name, wrapper in wrapped_modules(host.base_model):
        here = [(wrapper.adapters[n], w) for n, w in inputs if n in wrapper.adapters]
        if here:
            found[module_name] = [(u, w) for u, w in here if isinstance(u, AdapterUnit)]
    return found


def modules_of(host: AdapterHost, name: str) -> set[str]:
    return {m for m, w in wrapped_modules(host.base_model) if name in w.adapters}


def same_modules(host: AdapterHost, inputs: Inputs, what: str) -> None:
    first = inputs[0][0]
    expected = modules_of(host, first)
    for name, _ in inputs[1:]:
        got = modules_of(host, name)
        if got != expected:
            differ = sorted(got ^ expected)[:3]
            raise ValueError(
                f"{what} adapters {first!r} and {name!r} sit on different modules (e.g. {differ}); "
                f"a weighted {what} combination needs adapters on the same modules: give them the "
                "same target modules"
            )


def weighted_unit_sums(
    host: AdapterHost, inputs: Inputs, adapter_name: str, check: UnitCheck
) -> tuple[Values, dict[str, AdapterUnit]]:
    """``sum_i w_i p_i`` for every parameter of every unit, after ``check(module, first input's
    name, input name, first unit, unit)``; also the first input's unit per module (for the new
    config)."""
    values: Values = {}
    firsts: dict[str, AdapterUnit] = {}
    first_name = inputs[0][0]
    for module_name, wrapper in wrapped_modules(host.base_model):
        if first_name not in wrapper.adapters:
            continue
        first = wrapper.adapters[first_name]
        assert isinstance(first, AdapterUnit)
        sums: dict[str, torch.Tensor] = {}
        for name, w in inputs:
            unit = wrapper.adapters[name]
            assert isinstance(unit, AdapterUnit)
            check(module_name, first_name, name, first, unit)
            for pname, p in unit.named_parameters():
                term = wide(p) * w
                sums[pname] = sums[pname] + term if pname in sums else term
        for pname, value in sums.items():
            values[unit_path(module_name, adapter_name, pname)] = value
        firsts[module_name] = first
    return values, firsts


def check_same_shapes(
    what: str, module: str, first_name: str, name: str, first: AdapterUnit, unit: AdapterUnit
) -> None:
    """Raise ValueError unless every parameter of ``unit`` has the shape of ``first``'s."""
    mine = {n: tuple(p.shape) for n, p in unit.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in first.named_parameters()}
    if type(unit) is not type(first) or mine != theirs:
        raise ValueError(
            f"{what} adapters {first_name!r} and {name!r} differ in shape at {module} ({theirs} vs "
            f"{mine}); a weighted combination needs same-shaped adapters: give them the same settings"
        )
