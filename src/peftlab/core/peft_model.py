"""``PeftModel``: a transformers (or any torch) model with named adapters of any method.

The base model is adapted in place (target modules are wrapped, see :mod:`peftlab.core.layers`)
and frozen. Every adapter is a name, a config and the units its method created; one
:class:`~peftlab.core.layers.AdapterState` shared with all wrappers says which are active.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.core import checkpoint, combination, quantized
from peftlab.core.composition import Parallel, Stack
from peftlab.core.config import TASK_HEADS, PeftConfig, TaskType
from peftlab.core.injection import (
    find_targets,
    get_parent,
    logical_modules,
    saved_modules,
    unwrap,
    unwrapped,
    wrapped_modules,
)
from peftlab.core.layers import AdaptedModule, AdapterState, AdapterUnit, ModulesToSave, Routing, RoutingCache
from peftlab.core.registry import get_method, method_for

BASE_ADAPTER = "__base__"


def check_adapter_name(name: str) -> None:
    """Raise ValueError unless ``name`` can name an adapter (non-empty, no '.', not a Module method)."""
    if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
        raise ValueError(
            f"adapter name {name!r} is not usable: give a non-empty string without '.' "
            f"other than {BASE_ADAPTER!r}"
        )
    if hasattr(nn.ModuleDict, name):
        # adapters are keys of ModuleDicts, which cannot hold a key that names one of their methods
        raise ValueError(f"adapter name {name!r} is the name of a torch.nn.Module method; pick another name")


class PeftModel(nn.Module):
    """A model with adapters. ``base_model`` is the wrapped transformers model itself.

    ``PeftModel(model)`` with no config freezes the model and adds no adapter yet, for the
    AdapterHub style ``add_adapter(name, config=...)`` then ``train_adapter(name)``.
    """

    def __init__(
        self, model: nn.Module, config: PeftConfig | None = None, adapter_name: str = "default"
    ) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; use add_adapter() to add another adapter")
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._state = AdapterState()
        self._composition: Stack | Parallel | None = None  # how set_adapter was called
        self._frozen: set[str] = set()  # adapters loaded with is_trainable=False
        self._bias_params: dict[str, dict[str, nn.Parameter]] = {}
        # adapters that live beside the model rather than in a wrapped module (prefix tuning)
        self.model_adapters = nn.ModuleDict()
        # while detached: the adapted modules taken out of the base, by name (see detach())
        self._detached: list[tuple[str, nn.Module]] | None = None
        # per-sample routings (and the weights they gathered) reused across calls without autograd
        self.routing_cache = RoutingCache()
        self._layout_version = 0  # bumped when adapters are added or removed
        self._fingerprint_params: tuple[int, dict[str, list[torch.Tensor]]] = (-1, {})
        was_trainable = [p for p in model.parameters() if p.requires_grad]
        for p in was_trainable:
            p.requires_grad_(False)
        if config is not None:
            try:
                self.add_adapter(adapter_name, config)
            except Exception:
                # a failed wrap leaves the user's model as it was, trainability included
                for p in was_trainable:
                    p.requires_grad_(True)
                raise
            self.set_adapter(adapter_name)

    # ---- attribute pass-through -------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ---- adapters ---------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._state.active)

    @property
    def active_adapter(self) -> str:
        return self._state.active[0] if self._state.active else ""

    @property
    def active_composition(self) -> Stack | Parallel | None:
        """The ``Stack`` / ``Parallel`` block given to ``set_adapter``, or None."""
        return self._composition

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add a new, inactive adapter of any method (``set_adapter`` activates it)."""
        check_adapter_name(adapter_name)
        if not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a peftlab config (LoraConfig, ...), got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} exists already; delete_adapter({adapter_name!r}) first "
                "or pick another name"
            )
        method = method_for(config)
        self.peft_config[adapter_name] = config
        self._layout_version += 1
        try:
            # heads trained in full are wrapped first, so no target pattern reaches into them
            self._add_modules_to_save(adapter_name, config)
            method.inject(self.base_model, config, adapter_name, self._state)
            model_level = method.create_model_adapter(self.base_model, config)
            if model_level is not None:
                self.model_adapters[adapter_name] = model_level
            self._add_bias_params(adapter_name, config)
        except Exception:
            self._remove_adapter(adapter_name)
            raise
        self._update_trainable()

    def _add_modules_to_save(self, adapter_name: str, config: PeftConfig) -> None:
        requested: list[str] = list(getattr(config, "modules_to_save", None) or [])
        task_heads = TASK_HEADS.get(getattr(config, "task_type", None), ())  # type: ignore[arg-type]
        names: list[str] = []
        # PEFT writes the classification heads it might use ("classifier", "score") into
        # modules_to_save; like the task defaults, those need not all exist
        optional = set(TASK_HEADS[TaskType.SEQ_CLS])
        required = [n for n in requested if n not in optional]
        if required:
            names += find_targets(self.base_model, required, field="modules_to_save")
        for head in [*task_heads, *(n for n in requested if n in optional)]:
            names += [n for n, _ in logical_modules(self.base_model) if n == head or n.endswith("." + head)]
        for name in dict.fromkeys(names):
            parent, child = get_parent(self.base_model, name)
            module = getattr(parent, child)
            if isinstance(module, AdaptedModule):
                raise ValueError(f"modules_to_save: {name} already carries an adapter")
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, self._state)
                setattr(parent, child, module)
            module.add_copy(adapter_name)

    def _add_bias_params(self, adapter_name: str, config: PeftConfig) -> None:
        mode = getattr(config, "bias", "none")
        if mode == "none":
            return
        found: dict[str, nn.Parameter] = {}
        if mode == "all":
            # real parameter paths: a wrapper's ``bias`` attribute passes through to its base
            # layer, so named_modules() + getattr would list one bias under two paths
            # and never another adapter's own parameters (its units, its head copies)
            skip = {
                id(p)
                for other in self.peft_config
                for _, module in self.adapter_modules(other)
                for p in module.parameters()
            }
            for name, p in self.base_model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and id(p) not in skip:
                    found[f"base_model.{name}"] = p
        else:  # lora_only: biases of the layers this adapter wraps
            for name, wrapper in wrapped_modules(self.base_model):
                bias = getattr(wrapper.base_layer, "bias", None)
                if adapter_name in wrapper.adapters and isinstance(bias, nn.Parameter):
                    found[f"base_model.{name}.base_layer.bias"] = bias
        self._bias_params[adapter_name] = found

    def _remove_adapter(self, adapter_name: str) -> None:
        self._layout_version += 1
        for name, wrapper in list(wrapped_modules(self.base_model)):
            if adapter_name in wrapper.adapters:
                wrapper.remove_unit(adapter_name)
            if len(wrapper.adapters) == 0:
                unwrap(self.base_model, name)
        for name, saved in list(saved_modules(self.base_model)):
            if adapter_name in saved.modules_to_save:
                del saved.modules_to_save[adapter_name]
            if len(saved.modules_to_save) == 0:
                unwrap(self.base_model, name)
        for p in self._bias_params.pop(adapter_name, {}).values():
            p.requires_grad_(False)
        if adapter_name in self.model_adapters:
            del self.model_adapters[adapter_name]
        self.peft_config.pop(adapter_name, None)
        self._frozen.discard(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its parameters (unmerging it first if merged)."""
        self.require_adapter(adapter_name)
        self._remove_adapter(adapter_name)
        if self._composition is not None and adapter_name in self._composition.names:
            self._composition = None
        self._state.set_active(tuple(n for n in self._state.active if n != adapter_name))
        self._update_trainable()

    def require_adapter(self, adapter_name: str) -> None:
        """Raise ValueError naming this model's adapters when ``adapter_name`` is not one."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config) or 'none'}"
            )

    def set_adapter(self, adapter_name: str | Sequence[str] | Stack | Parallel) -> None:
        """Activate one adapter, or several: a list or ``Stack`` (all apply together, in
        order) or a ``Parallel`` block (each branch on its own copy of the batch)."""
        composition = adapter_name if isinstance(adapter_name, (Stack, Parallel)) else None
        names = _names_of(adapter_name)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name")
        for name in names:
            self.require_adapter(name)
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapter: adapter names repeat in {names}")
        leaving = [n for n in self.merged_adapters if n not in names]
        if leaving or (isinstance(composition, Parallel) and self.merged_adapters):
            self.unmerge_adapter()
        self._composition = composition
        self._state.set_active(tuple(names))
        self._update_trainable()

    def train_adapter(self, adapter_name: str | Sequence[str] | Stack | Parallel) -> None:
        """Activate the adapter(s) and make exactly their parameters trainable."""
        for name in _names_of(adapter_name):
            self.require_adapter(name)
            self._frozen.discard(name)
        self.set_adapter(adapter_name)
        self.train()

    def _update_trainable(self) -> None:
        active = set(self._state.active)
        for name in self.peft_config:
            trainable = name in active and name not in self._frozen
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(trainable)
        # a head trained in full runs its copy; the original stays frozen even when bias="all"
        # declares its bias (saved for PEFT, which also keeps it frozen)
        for _, saved in saved_modules(self.base_model):
            saved.original_module.requires_grad_(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run exactly the base model inside the block (merged adapters are unmerged)."""
        merged = self.merged_adapters
        if merged:
            self.unmerge_adapter()
        self._state.set_disabled(True)
        try:
            yield
        finally:
            self._state.set_disabled(False)
            if merged:
                self.merge_adapter(merged)

    # ---- parameters -------------------------------------------------------------------
    def adapter_modules(self, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
        """(path in this PeftModel, module) of every module holding this adapter's params."""
        for name, wrapper in wrapped_modules(self.base_model):
            if adapter_name in wrapper.adapters:
                yield f"base_model.{name}.adapters.{adapter_name}", wrapper.adapters[adapter_name]
        for name, saved in saved_modules(self.base_model):
            if adapter_name in saved.modules_to_save:
                yield (
                    f"base_model.{name}.modules_to_save.{adapter_name}",
                    saved.modules_to_save[adapter_name],
                )
        if adapter_name in self.model_adapters:
            yield f"model_adapters.{adapter_name}", self.model_adapters[adapter_name]

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The parameters an adapter declares, by their path in this PeftModel
        (``self.get_parameter(path)`` finds each)."""
        params: dict[str, nn.Parameter] = {}
        for path, module in self.adapter_modules(adapter_name):
            for pname, p in module.named_parameters():
                params[f"{path}.{pname}"] = p
        params.update(self.bias_parameters(adapter_name))
        return params

    def bias_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The base model's biases this adapter trains (``bias="all"`` / ``"lora_only"``), by path."""
        return dict(self._bias_params.get(adapter_name, {}))

    def set_adapter_trainable(self, adapter_name: str, trainable: bool) -> None:
        """Whether an adapter's parameters train while it is active (``is_trainable`` on load)."""
        self.require_adapter(adapter_name)
        if trainable:
            self._frozen.discard(adapter_name)
        else:
            self._frozen.add(adapter_name)
        self._update_trainable()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, shared parameters counted once."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ---- sharing one base ---------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        return self._detached is None

    def detach(self) -> nn.Module:
        """Put the base model's own modules back in place and keep this model's adapted modules
        aside (their parameters, and any optimizer over them, stay as they are), so that one base
        can carry several adapted models, one at a time; :meth:`attach` puts them back. Returns
        the base model, exactly as it was before the adapters went in."""
        if self._detached is not None:
            return self.base_model
        # wrapped modules first: a saved module (a head) may hold wrapped ones
        taken = [*wrapped_modules(self.base_model), *saved_modules(self.base_model)]
        for name, module in taken:
            parent, child = get_parent(self.base_model, name)
            setattr(parent, child, unwrapped(module))
        self._detached = taken
        return self.base_model

    def attach(self) -> None:
        """Put the adapted modules :meth:`detach` took out back into the base (no-op when attached)."""
        if self._detached is None:
            return
        for name, module in reversed(self._detached):
            parent, child = get_parent(self.base_model, name)
            setattr(parent, child, module)
        self._detached = None

    def _check_attached(self) -> None:
        if self._detached is not None:
            raise RuntimeError("this model's adapters are detached from its base; call attach() first")

    # ---- running ----------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str | Stack] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapters; ``adapter_names`` (one adapter
        name, ``"__base__"`` or ``Stack`` per sample) routes each sample through its own."""
        self._check_attached()
        args, kwargs, routing = self._plan_call(args, kwargs, adapter_names)
        with self._model_adapter_scope(routing):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str | Stack] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the active adapters, or per sample with
        ``adapter_names`` (as in :meth:`forward`; kept through every decoding step)."""
        self._check_attached()
        args, kwargs, routing = self._plan_call(args, kwargs, adapter_names)
        with self._model_adapter_scope(routing):
            return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    def _plan_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Sequence[str | Stack] | None
    ) -> tuple[tuple[Any, ...], dict[str, Any], Routing | None]:
        """The call's arguments and its per-sample routing (None: the active adapters apply)."""
        parallel = self._composition if isinstance(self._composition, Parallel) else None
        if adapter_names is None and (parallel is None or self._state.disabled):
            return args, kwargs, None
        if self._state.disabled:
            raise ValueError("adapter_names inside disable_adapter(): leave the block, or pass '__base__'")
        if self._state.routing is not None:
            raise RuntimeError(
                "this model is already running a call with per-sample adapters (nested or concurrent "
                "calls); per-sample calls on one model must run one at a time"
            )
        batch = _batch_size(args, kwargs)
        if adapter_names is not None:
            if parallel is not None:
                raise ValueError(
                    "adapter_names cannot be combined with an active Parallel block; set_adapter() a name "
                    "or list first, or drop adapter_names"
                )
            if isinstance(adapter_names, (str, Stack)) or len(adapter_names) != batch:
                got = "one name" if isinstance(adapter_names, (str, Stack)) else f"{len(adapter_names)} names"
                raise ValueError(
                    f"adapter_names needs one entry per sample: the batch has {batch} samples, got {got}"
                )
            per_sample = [self._group_of(entry) for entry in adapter_names]
        else:
            assert parallel is not None
            per_sample = [branch for branch in parallel.branches for _ in range(batch)]
            args, kwargs = _repeat_batch(args, kwargs, batch, len(parallel.branches))
        if self.merged_adapters:
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into the base weights; call "
                "unmerge_adapter() before running per-sample adapters or a Parallel block"
            )
        device = next((p.device for p in self.base_model.parameters()), torch.device("cpu"))
        if torch.is_grad_enabled():
            return args, kwargs, _routing(per_sample, device)
        key = (tuple(per_sample), device)
        fingerprint = self._adapter_fingerprint({n for names in per_sample for n in names})
        routing = self.routing_cache.get(key, fingerprint)
        if routing is None:
            routing = _routing(per_sample, device)
            self.routing_cache.put(key, fingerprint, routing)
        return args, kwargs, routing

    def _adapter_fingerprint(self, names: set[str]) -> tuple[tuple[int, int], ...]:
        """What the weights gathered for ``names`` depend on: each parameter's identity, where its
        data lies and its version counter (bumped by every in-place write, optimizer steps and
        ``load_state_dict`` included)."""
        version, by_name = self._fingerprint_params
        if version != self._layout_version:
            by_name = {}
            self._fingerprint_params = (self._layout_version, by_name)
        found: list[tuple[int, int]] = [(self._layout_version, 0)]
        for name in sorted(names):
            params = by_name.get(name)
            if params is None:
                params = by_name[name] = list(self.adapter_parameters(name).values())
            found += [(p._version, p.data_ptr()) for p in params]
        return tuple(found)

    def _group_of(self, entry: str | Stack) -> tuple[str, ...]:
        names = entry.names if isinstance(entry, Stack) else (entry,)
        if not isinstance(entry, (str, Stack)):
            raise ValueError(
                f"adapter_names: {entry!r} is not an adapter name; give names or '{BASE_ADAPTER}'"
            )
        if names == (BASE_ADAPTER,):
            return ()
        for name in names:
            if name not in self.peft_config:
                raise ValueError(
                    f"adapter_names: no adapter named {name!r}; this model has "
                    f"{sorted(self.peft_config) or 'none'} (and '{BASE_ADAPTER}' for no adapter)"
                )
        return names

    @contextlib.contextmanager
    def _model_adapter_scope(self, routing: Routing | None = None) -> Iterator[None]:
        """Where model-level adapters act: an active one whose module has ``scope(model)`` (a
        context manager) is in force for the whole call (prefix tuning enters here). With
        per-sample routing, each class's ``routed_scope(model, per_group, routing)`` instead."""
        if routing is not None:
            self._state.routing = routing
            try:
                with contextlib.ExitStack() as stack:
                    by_class: dict[type, list[list[nn.Module]]] = {}
                    for g, names in enumerate(routing.groups):
                        for name in names:
                            if name in self.model_adapters:
                                module = self.model_adapters[name]
                                per = by_class.setdefault(type(module), [[] for _ in routing.groups])
                                per[g].append(module)
                    for cls, per_group in by_class.items():
                        routed_scope = getattr(cls, "routed_scope", None)
                        if routed_scope is None:
                            raise ValueError(
                                f"{cls.__name__} adapters cannot run per sample (no routed_scope); "
                                "use set_adapter() and one batch per adapter"
                            )
                        stack.enter_context(routed_scope(self.base_model, per_group, routing))
                    yield
            finally:
                self._state.routing = None
            return
        with contextlib.ExitStack() as stack:
            if not self._state.disabled:
                for name in self._state.active:
                    adapter = self.model_adapters[name] if name in self.model_adapters else None  # noqa: SIM401
                    scope = getattr(adapter, "scope", None)
                    if scope is not None:
                        stack.enter_context(scope(self.base_model))
            yield

    # ---- merging ----------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        seen: dict[str, None] = {}
        for _, wrapper in wrapped_modules(self.base_model):
            seen.update(dict.fromkeys(wrapper.merged))
        return list(seen)

    def _check_mergeable(self, names: list[str]) -> None:
        for name in names:
            self.require_adapter(name)
            method = method_for(self.peft_config[name])
            if not method.mergeable:
                raise ValueError(
                    f"adapter {name!r} ({method.peft_type}) cannot be merged: {method.unmergeable_reason}"
                )

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base weights; undo with unmerge_adapter.

        Every merged weight is checked to be finite, and a merge that could not be undone
        (an IA3 scale near zero) is refused before anything changes.
        """
        if adapter_names is None and isinstance(self._composition, Parallel):
            raise ValueError(
                "a Parallel block runs its branches side by side, so they cannot be merged into one set "
                "of weights; set_adapter() one branch, or pass adapter_names to merge"
            )
        names = list(self._state.active if adapter_names is None else adapter_names)
        self._check_mergeable(names)
        wrappers = [w for _, w in wrapped_modules(self.base_model)]
        for wrapper in wrappers:
            for name in names:
                unit = wrapper.adapters[name] if name in wrapper.adapters else None  # noqa: SIM401
                reason = unit.check_unmergeable() if isinstance(unit, AdapterUnit) else None
                if reason and name not in wrapper.merged:
                    raise ValueError(f"cannot merge adapter {name!r} reversibly: {reason}")
        done: list[tuple[AdaptedModule, int]] = []
        try:
            for wrapper in wrappers:
                before = len(wrapper.merged)
                done.append((wrapper, before))
                wrapper.merge(names)
        except Exception:
            for wrapper, before in reversed(done):
                if len(wrapper.merged) > before:
                    wrapper.unmerge(wrapper.merged[before:])
            raise

    def unmerge_adapter(self) -> None:
        """Undo every merge, restoring the base weights."""
        for _, wrapper in wrapped_modules(self.base_model):
            wrapper.unmerge()

    def merge_and_unload(
        self, adapter_names: list[str] | None = None, *, requantize: bool = False
    ) -> nn.Module:
        """Merge the active (or named) adapters for good and return the plain base model.

        On a quantized base (bitsandbytes 4-/8-bit layers) every quantized layer is de-quantized
        and the adapters folded in float32: the result is a full-precision model in the layers'
        compute dtype, equal to the adapted model up to float rounding. With ``requantize=True``
        the merged layers are quantized again with their own settings (the other layers stay as
        they were), which rounds ``W + dW`` once more: the merged model then differs from the
        adapted one by about one quantization step (README, "Adapters on a quantized base").
        """
        names = list(self._state.active if adapter_names is None else adapter_names)
        self._check_mergeable(names)
        if requantize and not quantized.quantized_modules(self.base_model):
            raise ValueError("merge_and_unload(requantize=True) needs a quantized base; this one is not")
        # de-quantize (to float32) where adapters merge: requantize keeps the other layers' codes
        settings: dict[str, tuple[Any, torch.dtype]] = {}
        for name, wrapper in wrapped_modules(self.base_model):
            if quantized.is_quantized(wrapper.base_layer) and any(n in wrapper.adapters for n in names):
                settings[name] = (
                    quantized.config_of(wrapper.base_layer),
                    quantized.compute_dtype_of(wrapper.base_layer),
                )
                wrapper.base_layer = quantized.dequantize_linear(wrapper.base_layer)
        for _, wrapper in wrapped_modules(self.base_model):
            pending = [n for n in names if n in wrapper.adapters and n not in wrapper.merged]
            wrapper.merge(pending)
        model = self._unload(keep=names)
        for name, (config, dtype) in settings.items():
            parent, child = get_parent(model, name)
            merged = getattr(parent, child)
            if requantize:
                merged.bias = None if merged.bias is None else nn.Parameter(merged.bias.to(dtype), False)
                setattr(parent, child, quantized.quantize_linear(merged, config))
            else:
                merged.to(dtype)
        if not requantize:
            for name, module in quantized.quantized_modules(model):
                parent, child = get_parent(model, name)
                dtype = quantized.compute_dtype_of(module)
                setattr(parent, child, quantized.dequantize_linear(module).to(dtype))
            quantized.forget_quantization(model)
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        self.unmerge_adapter()
        return self._unload(keep=[])

    def _unload(self, keep: list[str]) -> nn.Module:
        for name, saved in list(saved_modules(self.base_model)):
            chosen = next((n for n in keep if n in saved.modules_to_save), None)
            parent, child = get_parent(self.base_model, name)
            setattr(parent, child, saved.modules_to_save[chosen] if chosen else saved.original_module)
        for name, _ in list(wrapped_modules(self.base_model)):
            unwrap(self.base_model, name)
        for adapter in list(self.peft_config):
            self._bias_params.pop(adapter, None)
        self.peft_config.clear()
        self._state.set_active(())
        return self.base_model

    # ---- combining ----------------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "linear",
        **kwargs: Any,
    ) -> None:
        """Add ``adapter_name``, a weighted combination of existing adapters of one method, inactive
        like ``add_adapter`` (see :mod:`peftlab.core.combination` and each method's rule).

        ``combination_type``: ``"linear"`` for every method; LoRA also ``"cat"``, ``"svd"``,
        ``"ties"``, ``"ties_svd"``, ``"dare_linear"``, ``"dare_linear_svd"``, ``"dare_ties"``,
        ``"dare_ties_svd"``, ``"magnitude_prune"``, ``"magnitude_prune_svd"`` (HF PEFT's semantics;
        see :mod:`peftlab.methods.lora`). Options (``kwargs``), each only with the types it
        applies to:

        - ``density`` (float in (0, 1], required by the ties / dare / magnitude_prune types): the
          fraction of each input's entries kept (by magnitude, or at random for DARE);
        - ``majority_sign_method`` (``"total"``, default, or ``"frequency"``; the ``ties`` types):
          how TIES elects each entry's sign;
        - ``svd_rank`` (int, the ``svd`` types): the new rank, default the largest input rank;
        - ``svd_clamp`` (float in (0, 1], the ``svd`` types): clamp the factors to that quantile
          of their entries; ``svd_full_matrices`` (bool) and ``svd_driver`` (``"gesvd"`` /
          ``"gesvdj"`` / ``"gesvda"``, CUDA only, ignored elsewhere): passed to the SVD.

        DARE draws from torch's global RNG after the new adapter's initialisation, as HF PEFT
        does: with ``torch.manual_seed(s)`` before the call the result equals PEFT's for that seed.
        Inputs, types and options are checked before the adapter is added (a bad one is a
        ValueError naming it and the fix), and a failure leaves the model unchanged.
        """
        method = get_method(combination.common_peft_type(self, adapters))
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} exists already; pick another adapter_name or "
                f"delete_adapter({adapter_name!r}) first"
            )
        config, values = combination.combine(
            self, method, adapters, weights, adapter_name, combination_type, kwargs
        )
        flags = [(p, p.requires_grad) for p in self.parameters()]
        self.add_adapter(adapter_name, config)
        try:
            self._set_values(adapter_name, values() if callable(values) else values)
        except BaseException:
            self.delete_adapter(adapter_name)
            for p, flag in flags:
                p.requires_grad_(flag)
            raise

    def _set_values(self, adapter_name: str, values: dict[str, torch.Tensor]) -> None:
        """Copy ``values`` (by parameter path) into the adapter, which must have exactly those."""
        params = self.adapter_parameters(adapter_name)
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

    # ---- checkpoints ------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Save adapters in PEFT's format: "default" in ``save_directory``, others in sub-folders
        (see :mod:`peftlab.core.checkpoint`)."""
        checkpoint.save_pretrained(self, save_directory, selected_adapters=selected_adapters, **kwargs)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (inactive until set_adapter).

        Options: ``subfolder``, ``config`` (use this config instead of the file's), ``strict``
        (default True: missing or unexpected weights are errors), ``allow_pickle`` (read a
        legacy ``adapter_model.bin`` with ``torch.load(weights_only=True)``). A failed load
        leaves the model as it was.
        """
        if adapter_name in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} exists already; pick another adapter_name or delete_adapter() "
                "it first"
            )
        saved = checkpoint.read_checkpoint(model_id, **kwargs)
        flags = [(p, p.requires_grad) for p in self.parameters()]
        try:
            self.add_adapter(adapter_name, saved.config)
        except ValueError as err:
            _restore(flags)
            raise saved.does_not_fit(err) from None
        try:
            checkpoint.fill_adapter(self, adapter_name, saved, strict=bool(kwargs.get("strict", True)))
        except BaseException:
            self.delete_adapter(adapter_name)
            _restore(flags)
            raise
        self.set_adapter_trainable(adapter_name, is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` (active; frozen unless
        ``is_trainable``). Options as in :meth:`load_adapter`; a failed load leaves ``model``
        as it was."""
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; use model.load_adapter(path, adapter_name=...)")
        saved = checkpoint.read_checkpoint(model_id, **kwargs)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            peft_model = cls(model, saved.config, adapter_name=adapter_name)
        except ValueError as err:
            _restore(flags)
            raise saved.does_not_fit(err) from None
        try:
            checkpoint.fill_adapter(peft_model, adapter_name, saved, strict=bool(kwargs.get("strict", True)))
        except BaseException:
            peft_model.unload()
            _restore(flags)
            raise
        peft_model.set_adapter_trainable(adapter_name, is_trainable)
        return peft_model


def _restore(flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Put back requires_grad flags taken before a failed change."""
    for p, flag in flags:
        p.requires_grad_(flag)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a parameter shared by several modules (tied embeddings) counts once,
    and a 4-bit quantized weight counts its weights, not its packed bytes (as HF PEFT counts)."""
    trainable = total = 0
    for p in model.parameters():
        n = quantized.weight_count(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _names_of(adapter_name: str | Sequence[str] | Stack | Parallel) -> list[str]:
    if isinstance(adapter_name, (Stack, Parallel)):
        return list(adapter_name.names)
    if isinstance(adapter_name, str):
        return [adapter_name]
    names = list(adapter_name)
    for name in names:
        if not isinstance(name, str):
            raise ValueError(
                f"set_adapter: a list holds adapter names only, got {name!r}; use Stack(...) or "
                "Parallel(...) for composition"
            )
    return names


def _routing(per_sample: list[tuple[str, ...]], device: torch.device) -> Routing:
    groups = list(dict.fromkeys(per_sample))
    where = {g: i for i, g in enumerate(groups)}
    index = torch.tensor([where[g] for g in per_sample], dtype=torch.long, device=device)
    return Routing(groups, index)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The samples in a call: its inputs, or an encoder-decoder's decoder inputs where the
    encoder's output is given instead (a decoding step)."""
    for key in (
        "input_ids",
        "inputs_embeds",
        "pixel_values",
        "input_features",
        "decoder_input_ids",
        "decoder_inputs_embeds",
    ):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    for value in args:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError(
        "per-sample adapters need the inputs as tensors (input_ids, inputs_embeds or decoder_input_ids)"
    )


def _repeat_batch(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, times: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Every per-sample tensor argument repeated ``times`` along the batch (block after block)."""

    def rep(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value

    if kwargs.get("past_key_values") is not None:
        raise ValueError("a Parallel block cannot continue from past_key_values; run it on the full inputs")
    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with one adapter, freezing every base parameter."""
    return PeftModel(model, config, adapter_name=adapter_name)
