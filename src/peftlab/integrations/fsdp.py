"""Sharding a peftlab model with FSDP so that frozen and trainable weights never share a shard
group: every adapter unit is its own FSDP unit, every transformer block another.

FSDP flattens (FSDP1) or all-gathers (FSDP2) the parameters of one wrapped module together.
A block holding both frozen base weights and trainable adapter weights would make FSDP1 with
``use_orig_params=False`` refuse the model, and cost gradient memory and reduce-scatter
traffic for the frozen weights otherwise. The groups here are:

- each adapter module (an :class:`~peftlab.core.layers.AdapterUnit`, a ``modules_to_save`` copy,
  a model-level adapter such as a prefix): trainable or frozen as a whole;
- each transformer block (the classes in the model's ``_no_split_modules``, or the given
  ``layer_classes`` argument) with its frozen base weights;
- the root: the rest of the frozen base (embeddings, final norm, head).

FSDP2 (``torch.distributed.fsdp.fully_shard``, recommended): :func:`apply_fsdp2`. Adapter
units apply through their ``pre``/``delta``/``post`` methods rather than ``forward``, so they
are registered with ``register_fsdp_forward_method``. :func:`save_pretrained` gathers the
adapters and writes the usual PEFT-format checkpoint from rank 0.

FSDP1 (``FullyShardedDataParallel``): :func:`fsdp_auto_wrap_policy`. FSDP1 puts a wrapper in
place of each unit and gathers its parameters only inside that wrapper's ``forward``; adapter
units are called through their own methods, so there a target layer's ``base_layer`` and its
:class:`~peftlab.core.layers.AdaptedModule` (then holding only the units) are the units instead.
Prefix tuning needs FSDP2, and so does saving: FSDP1's wrappers change the module paths the
checkpoint keys are made from.

Not supported on a sharded model: per-sample ``adapter_names`` (the batched kernels read all
adapters' weights at once), trainable base biases (``bias="all"`` / ``"lora_only"`` sit inside
frozen layers; a clear error says so), merging.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from peftlab.core.layers import AdaptedModule, AdapterUnit
from peftlab.core.peft_model import PeftModel

__all__ = [
    "adapter_modules",
    "apply_fsdp2",
    "block_classes",
    "fsdp_auto_wrap_policy",
    "fsdp_units",
    "save_pretrained",
    "shard_groups",
]


def _require_peft_model(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"expected a peftlab PeftModel, got {type(model).__name__}; shard the model returned by "
            "get_peft_model(), after all adapters are added"
        )
    return model


def adapter_modules(model: PeftModel) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module holding adapter parameters, for all adapters."""
    _require_peft_model(model)
    return [item for name in model.peft_config for item in model.adapter_modules(name)]


def block_classes(model: nn.Module, names: Iterable[str] | None = None) -> tuple[type[nn.Module], ...]:
    """The transformer block classes in ``model``: those named in ``names``, by default the
    base model's ``_no_split_modules`` (what transformers and accelerate wrap per block)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    wanted = set(names if names is not None else getattr(base, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    unknown = wanted - {cls.__name__ for cls in found}
    if names is not None and unknown:
        raise ValueError(f"block_classes: no module of class {sorted(unknown)} in this model")
    return tuple(sorted(found, key=lambda cls: cls.__name__))


def fsdp_units(
    model: nn.Module, *, fsdp1: bool = False, layer_classes: Iterable[type[nn.Module]] | None = None
) -> list[nn.Module]:
    """The modules that become FSDP units (FSDP2 by default, FSDP1 with ``fsdp1=True``), children
    before parents; the root is the last unit and is not listed. Raises ValueError when one
    unit would mix trainable and frozen parameters."""
    model = _require_peft_model(model)
    layers = tuple(layer_classes) if layer_classes is not None else block_classes(model)
    units: list[nn.Module] = []
    for path, module in adapter_modules(model):
        if isinstance(module, AdapterUnit) and fsdp1:
            continue  # FSDP1: the wrapper below stands for its units
        if path.startswith("model_adapters.") and fsdp1:
            raise ValueError(
                f"{path} ({type(module).__name__}) is applied outside forward(), which FSDP1 cannot "
                "shard; use peftlab.integrations.fsdp.apply_fsdp2 (torch.distributed.fsdp.fully_shard)"
            )
        units.append(module)
    if fsdp1:
        for wrapper in model.modules():
            if isinstance(wrapper, AdaptedModule):
                units += [wrapper.base_layer, wrapper]
    units += [m for m in model.modules() if isinstance(m, layers)]
    _check_groups(model, units)
    return units


def _check_groups(model: nn.Module, units: list[nn.Module]) -> None:
    """Every parameter goes to its nearest enclosing unit (else the root); a group with both
    trainable and frozen parameters is an error naming one of each."""
    chosen = {id(m) for m in units}
    groups: dict[str, list[tuple[str, bool]]] = {}

    def walk(module: nn.Module, path: str, group: str) -> None:
        if id(module) in chosen:
            group = path
        for pname, p in module.named_parameters(recurse=False):
            groups.setdefault(group, []).append((f"{path}.{pname}" if path else pname, p.requires_grad))
        for cname, child in module.named_children():
            walk(child, f"{path}.{cname}" if path else cname, group)

    walk(model, "", "")
    for group, params in groups.items():
        trainable = [n for n, t in params if t]
        frozen = [n for n, t in params if not t]
        if trainable and frozen:
            if ".adapters." in frozen[0]:
                hint = (
                    "FSDP1 wraps the adapters of one target layer together, so only one of them may "
                    "train: delete the frozen adapters first, or use apply_fsdp2 (one unit per adapter)"
                )
            else:
                hint = (
                    "base parameters made trainable (LoRA bias='all' / 'lora_only', or by hand) sit "
                    "inside frozen layers: train with bias='none', or freeze them"
                )
            raise ValueError(
                f"FSDP unit {group or '<root>'} would hold trainable {trainable[0]} and frozen "
                f"{frozen[0]} together; {hint}"
            )


def fsdp_auto_wrap_policy(model: nn.Module, layer_classes: Iterable[type[nn.Module]] | None = None) -> Any:
    """An FSDP1 ``auto_wrap_policy`` (``torch.distributed.fsdp.wrap.CustomPolicy``): adapter
    holders, the base layers they wrap and the transformer blocks each become an FSDP unit.

        FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), ...)

    Build it after every adapter is added: it selects these exact module objects.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    chosen = {id(m) for m in fsdp_units(model, fsdp1=True, layer_classes=layer_classes)}
    return CustomPolicy(lambda module: id(module) in chosen)


def apply_fsdp2(
    model: nn.Module,
    *,
    mesh: Any = None,
    layer_classes: Iterable[type[nn.Module]] | None = None,
    **fully_shard_kwargs: Any,
) -> PeftModel:
    """Shard ``model`` in place with FSDP2 ``fully_shard``: each adapter module, each transformer
    block, then the root. ``mesh`` and ``fully_shard_kwargs`` (``reshard_after_forward``,
    ``mp_policy``, ``offload_policy``) go to every ``fully_shard`` call. Call it in every
    process after ``init_process_group`` and before creating the optimizer."""
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError as err:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard): {err}") from None
    peft = _require_peft_model(model)
    if peft.merged_adapters:
        raise ValueError(f"adapters {peft.merged_adapters} are merged; unmerge_adapter() before sharding")
    units = fsdp_units(peft, layer_classes=layer_classes)
    kwargs = {"mesh": mesh, **fully_shard_kwargs}
    for module in units:
        methods: tuple[str, ...] = ()
        unit_kwargs = kwargs
        declared = getattr(module, "fsdp_forward_methods", None)
        if isinstance(module, AdapterUnit):
            methods = (module.stage,)
        elif declared:
            methods = tuple(declared)
            # their results view the gathered parameters and are used for the whole call
            unit_kwargs = {**kwargs, "reshard_after_forward": False}
        fully_shard(module, **unit_kwargs)
        for method in methods:
            register_fsdp_forward_method(module, method)
    fully_shard(peft, **kwargs)
    return peft


def shard_groups(model: nn.Module) -> dict[str, list[str]]:
    """FSDP2: the parameter names each ``fully_shard`` unit manages, by the unit's module path
    (``""`` for the root) - each group is all-gathered and reduce-scattered together."""
    from torch.distributed.fsdp import FSDPModule

    units = sorted((path for path, m in model.named_modules() if isinstance(m, FSDPModule)), key=len)
    if not units:
        raise ValueError("the model is not sharded with fully_shard (apply_fsdp2) yet")
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        owner = max((u for u in units if u == "" or name.startswith(u + ".")), key=len)
        groups.setdefault(owner, []).append(name)
    return groups


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike[str], selected_adapters: list[str] | None = None
) -> None:
    """``PeftModel.save_pretrained`` for a model sharded by :func:`apply_fsdp2`: every process
    calls it (the adapters are all-gathered), rank 0 writes the checkpoint."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    peft = _require_peft_model(model)
    names = list(peft.peft_config) if selected_adapters is None else list(selected_adapters)
    sharded = [m for name in names for _, m in peft.adapter_modules(name) if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        if not dist.is_initialized() or dist.get_rank() == 0:
            with torch.no_grad():
                peft.save_pretrained(save_directory, selected_adapters=names)
    finally:
        for module in sharded:
            module.reshard()
    if dist.is_initialized():
        dist.barrier()
