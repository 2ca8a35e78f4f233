"""The one injection mechanism: find target modules, wrap them in place, unwrap them exactly.

Matching works on whole dotted-path components, never substrings: ``"v_proj"`` matches
``model.layers.0.self_attn.v_proj`` but not ``model.layers.0.self_attn.kv_proj``. A string
target is a regex that must match the full module name; ``"all-linear"`` is every linear
layer except the model's output head.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from peftlab.core.layers import AdaptedModule, AdapterState, ModulesToSave, is_conv1d

ALL_LINEAR = "all-linear"


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) as the user sees the model: wrappers stand for their base layer
    and are not descended into, so adapter internals are never targets."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            if not isinstance(child, (AdaptedModule, ModulesToSave)):
                yield from walk(name, child)

    yield from walk("", model)


def unwrapped(module: nn.Module) -> nn.Module:
    if isinstance(module, AdaptedModule):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def is_linear(module: nn.Module) -> bool:
    base = unwrapped(module)
    return isinstance(base, nn.Linear) or is_conv1d(base)


def matches(name: str, target: list[str] | str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Index of the transformer block a module lives in: the first numeric path component."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's output (excluded from "all-linear")."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in logical_modules(model):
        if head is not None and unwrapped(module) is unwrapped(head):
            names.add(name)
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Linear layers that can carry an adapter (heads trained in full are not among them)."""
    return [
        name
        for name, module in logical_modules(model)
        if is_linear(module) and not isinstance(module, ModulesToSave)
    ]


def candidate_suffixes(model: nn.Module) -> list[str]:
    """The distinct last components of linear layers: what a user can put in target_modules."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})


def find_targets(
    model: nn.Module,
    target: list[str] | str,
    *,
    field: str = "target_modules",
    layers_to_transform: list[int] | None = None,
) -> list[str]:
    """Names of the modules ``target`` selects; an error listing candidates if none match."""
    if target == ALL_LINEAR:
        heads = output_head_names(model)
        names = [n for n in linear_module_names(model) if n not in heads]
    else:
        names = [
            n for n, m in logical_modules(model) if matches(n, target) and not isinstance(m, ModulesToSave)
        ]
        # a suffix that names a container (e.g. "mlp") is not a target; its linears are not
        # selected implicitly either, which keeps matching predictable
    if layers_to_transform is not None:
        wanted = set(layers_to_transform)
        names = [n for n in names if layer_index(n) in wanted]
    if not names:
        raise ValueError(
            f"{field}={target!r} matches no module of {type(model).__name__}"
            + (f" in layers {layers_to_transform}" if layers_to_transform is not None else "")
            + f"; candidate linear module names are: {', '.join(candidate_suffixes(model))}"
        )
    if isinstance(target, list):
        found = {t for t in target if any(matches(n, [t]) for n in names)}
        missing = [t for t in target if t not in found]
        if missing and layers_to_transform is None:
            raise ValueError(
                f"{field}: {missing} match no module of {type(model).__name__}; candidate "
                f"linear module names are: {', '.join(candidate_suffixes(model))}"
            )
    return names


def exact_suffixes(model: nn.Module, chosen: set[str], layers: list[int] | None = None) -> list[str]:
    """The shortest module-name suffixes that select exactly ``chosen`` among the model's modules
    (within ``layers`` when given), as PEFT and peftlab match ``target_modules`` lists."""
    names = [n for n, _ in logical_modules(model)]
    if layers is not None:
        names = [n for n in names if layer_index(n) in set(layers)]
    found: set[str] = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(n in chosen for n in names if matches(n, [suffix])):
                found.add(suffix)
                break
    return sorted(found)


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child


def wrap(model: nn.Module, name: str, state: AdapterState) -> AdaptedModule:
    """Wrap module ``name`` (once) and return its wrapper."""
    parent, child = get_parent(model, name)
    module = getattr(parent, child)
    if isinstance(module, AdaptedModule):
        return module
    if isinstance(module, ModulesToSave):
        raise ValueError(f"{name} is in modules_to_save (trained in full); it cannot also carry an adapter")
    wrapper = AdaptedModule(module, state)
    setattr(parent, child, wrapper)
    return wrapper


def unwrap(model: nn.Module, name: str) -> nn.Module:
    """Put the original module back on its parent and return it."""
    parent, child = get_parent(model, name)
    module = getattr(parent, child)
    original = unwrapped(module)
    setattr(parent, child, original)
    return original


def wrapped_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedModule]]:
    for name, module in logical_modules(model):
        if isinstance(module, AdaptedModule):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in logical_modules(model):
        if isinstance(module, ModulesToSave):
            yield name, module
