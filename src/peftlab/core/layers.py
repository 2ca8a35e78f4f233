"""The one wrapper every module-level method uses, and the adapter units it holds.

A targeted module (``nn.Linear``, GPT-2 ``Conv1D``, ...) is replaced on its parent by an
:class:`AdaptedModule` that keeps the original as ``base_layer`` and holds one
:class:`AdapterUnit` per adapter name. The wrapped forward is

    y = post( base_layer(pre(x)) + sum(delta(pre(x))) )

where each unit acts at one stage: ``pre`` rescales the input (IA3 on feed-forward
layers), ``delta`` adds a term computed from the input (LoRA), ``post`` transforms the
output (IA3 scaling, bottleneck adapters). Units declare their parameters simply by being
modules: freezing, saving and counting walk ``AdaptedModule.adapters[name]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.quantized import IN_PLACE_REFUSAL, is_quantized, module_scheme

Stage = Literal["pre", "delta", "post"]


class Routing:
    """Per-sample adapters for the span of one model call.

    ``groups[g]`` is a tuple of adapter names applied together (``()`` is the base model) and
    ``index[i]`` the group of sample ``i``. Units gather their per-group weights by ``index``
    and apply them with batched products, so the cost does not grow with the number of groups.
    ``cache`` holds per-call values (stacked weights) keyed by the module that made them.
    """

    def __init__(self, groups: Sequence[tuple[str, ...]], index: torch.Tensor) -> None:
        self.groups = tuple(groups)
        self.index = index
        self.cache: dict[Any, Any] = {}
        self._expanded: dict[tuple[int, torch.device], torch.Tensor] = {}

    def sample_index(self, batch: int, device: torch.device) -> torch.Tensor:
        """The group of each row of a tensor with ``batch`` rows (beam search and
        ``num_return_sequences`` repeat each sample in place, so rows map by repetition)."""
        key = (batch, device)
        found = self._expanded.get(key)
        if found is None:
            n = self.index.shape[0]
            if batch % n != 0:
                raise ValueError(
                    f"adapter_names gives {n} samples but a layer saw a batch of {batch}; per-sample "
                    "adapters need every layer to see the batch (or a whole multiple of it) in dim 0"
                )
            found = self.index.to(device)
            if batch != n:
                found = found.repeat_interleave(batch // n)
            self._expanded[key] = found
        return found


class RoutingCache:
    """Per-sample routings kept from one call to the next, so that the weights their units
    stacked and gathered (``Routing.cache``) serve every call with the same rows' adapters: the
    decoding steps of a continuous batch, where each step is its own call.

    An entry is found by the per-sample groups (which adapters each row takes) and the device,
    and used only while ``fingerprint`` (the adapters' parameters: which tensors, where their
    data lies, their in-place version counters) is unchanged: loading, deleting or combining
    adapters, moving the model and any in-place write to a parameter all make a new one. Only
    calls without autograd use it (training builds its routing afresh every call). Writes through
    ``param.data`` bypass version counters; call :meth:`clear` after them.
    """

    def __init__(self, size: int = 2) -> None:
        # a continuous batch makes two kinds of call per step: the decoding step and a prefill
        self.size = size
        self._entries: dict[Any, tuple[Any, Routing]] = {}

    def get(self, key: Any, fingerprint: Any) -> Routing | None:
        found = self._entries.pop(key, None)
        if found is None or found[0] != fingerprint:
            return None
        self._entries[key] = found  # most recently used last
        return found[1]

    def put(self, key: Any, fingerprint: Any, routing: Routing) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (fingerprint, routing)
        while len(self._entries) > self.size:
            del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        self._entries.clear()


class AdapterState:
    """Which adapters are active; one object shared by the model and all its wrappers.

    Wrappers cache their active units against ``version``, so switching adapters costs one
    counter bump instead of a walk over every wrapped module. ``routing`` is set for the span
    of a call with per-sample adapters and then overrides ``active``.
    """

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.version = 0
        self.routing: Routing | None = None

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active = names
        self.version += 1

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self.version += 1


class AdapterUnit(nn.Module):
    """One adapter's parameters at one wrapped module.

    Subclasses set ``stage`` and implement the matching method. ``post_order`` sorts post
    units so linear rescaling runs before non-linear transforms (which keeps IA3 mergeable
    under a bottleneck adapter on the same module).
    """

    stage: Stage = "delta"
    post_order: ClassVar[int] = 0
    mergeable: ClassVar[bool] = False
    unmergeable_reason: ClassVar[str] = ""

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def post(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (weight, bias) of ``base_layer`` with this adapter folded in (not in place)."""
        raise TypeError(self.unmergeable_reason or f"{type(self).__name__} cannot be merged")

    def unmerged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`merged_weights`."""
        raise TypeError(self.unmergeable_reason or f"{type(self).__name__} cannot be merged")

    def check_unmergeable(self) -> str | None:
        """Why merging this unit now could not be undone, or None when it can."""
        return None

    @classmethod
    def routed(
        cls,
        stage: Stage,
        per_group: Sequence[Sequence[AdapterUnit]],
        index: torch.Tensor,
        t: torch.Tensor,
        cache: dict[Any, Any],
    ) -> torch.Tensor | None:
        """Apply this class's units at ``stage`` to a batch whose row ``i`` belongs to group
        ``index[i]``; ``per_group[g]`` lists group ``g``'s units of this class in order (often
        none). ``pre``/``post`` return the transformed ``t``; ``delta`` returns the summed delta
        for input ``t``, or None when no row gets one. ``cache`` lives for the whole call (all
        decoding steps of a ``generate``) and is private to this module, class and stage.

        This default runs each group on its rows in turn; methods override it with gathered
        weights and batched products so that the cost stays flat in the number of groups.
        """
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        for g, units in enumerate(per_group):
            if not units:
                continue
            rows = (index == g).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = t.index_select(0, rows)
            if stage == "pre":
                for unit in units:
                    part = unit.pre(part)
            elif stage == "post":
                for unit in units:
                    part = unit.post(part)
            else:
                deltas = [unit.delta(part) for unit in units]
                part = deltas[0]
                for d in deltas[1:]:
                    part = part + d
            pieces.append((rows, part))
        if stage == "delta":
            if not pieces:
                return None
            first = pieces[0][1]
            out = first.new_zeros((*t.shape[:-1], first.shape[-1]))
        else:
            out = t
        for rows, part in pieces:
            out = out.index_copy(0, rows, part.to(out.dtype))
        return out


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def base_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def base_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 ``Conv1D`` (fan-in/fan-out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    raise TypeError(
        f"{type(module).__name__} is not a linear layer; peftlab adapts nn.Linear and transformers' Conv1D"
    )


class AdaptedModule(nn.Module):
    """A target module wrapped with its adapters; ``base_layer`` is the untouched original."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        # plain attributes (not submodules): shared state and merge bookkeeping
        self._state = state
        self.merged: list[str] = []
        self._cache_version = -1
        self._cached: tuple[tuple[AdapterUnit, ...], tuple[AdapterUnit, ...], tuple[AdapterUnit, ...]] = (
            (),
            (),
            (),
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_layer", "adapters"}:
                raise
            return getattr(self.base_layer, name)

    def add_unit(self, adapter_name: str, unit: AdapterUnit) -> None:
        self.adapters[adapter_name] = unit
        self._cache_version = -1

    def remove_unit(self, adapter_name: str) -> None:
        if adapter_name in self.merged:
            self.unmerge([adapter_name])
        del self.adapters[adapter_name]
        self._cache_version = -1

    def _active_units(
        self,
    ) -> tuple[tuple[AdapterUnit, ...], tuple[AdapterUnit, ...], tuple[AdapterUnit, ...]]:
        state = self._state
        if self._cache_version != state.version:
            pre: list[AdapterUnit] = []
            delta: list[AdapterUnit] = []
            post: list[AdapterUnit] = []
            if not state.disabled:
                for name in state.active:
                    unit = self.adapters[name] if name in self.adapters else None  # noqa: SIM401
                    if unit is None or name in self.merged:
                        continue
                    assert isinstance(unit, AdapterUnit)
                    {"pre": pre, "delta": delta, "post": post}[unit.stage].append(unit)
            post.sort(key=lambda u: u.post_order)
            self._cached = (tuple(pre), tuple(delta), tuple(post))
            self._cache_version = state.version
        return self._cached

    def _route_plan(
        self, routing: Routing
    ) -> tuple[list[tuple[type[AdapterUnit], list[list[AdapterUnit]]]], ...]:
        """Per stage, each unit class with its units per routing group (built once per call)."""
        key = ("plan", id(self))
        plan = routing.cache.get(key)
        if plan is None:
            stages: dict[str, dict[type[AdapterUnit], list[list[AdapterUnit]]]] = {
                "pre": {},
                "delta": {},
                "post": {},
            }
            for g, names in enumerate(routing.groups):
                for name in names:
                    unit = self.adapters[name] if name in self.adapters else None  # noqa: SIM401
                    if unit is None:
                        continue
                    assert isinstance(unit, AdapterUnit)
                    per = stages[unit.stage].setdefault(type(unit), [[] for _ in routing.groups])
                    per[g].append(unit)
            post = sorted(stages["post"].items(), key=lambda item: item[0].post_order)
            plan = (list(stages["pre"].items()), list(stages["delta"].items()), post)
            routing.cache[key] = plan
        return plan  # type: ignore[no-any-return]

    def _routed_forward(self, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            raise ValueError(
                f"adapters {self.merged} are merged into the base weights, so per-sample adapters would "
                "add them again; call unmerge_adapter() before passing adapter_names"
            )
        pre, delta, post = self._route_plan(routing)
        index = routing.sample_index(x.shape[0], x.device)

        def cache(cls: type[AdapterUnit], stage: str) -> dict[Any, Any]:
            found: dict[Any, Any] = routing.cache.setdefault((id(self), cls, stage), {})
            return found

        for cls, per_group in pre:
            out = cls.routed("pre", per_group, index, x, cache(cls, "pre"))
            assert out is not None
            x = out
        y = self.base_layer(x, *args, **kwargs)
        for cls, per_group in delta:
            d = cls.routed("delta", per_group, index, x, cache(cls, "delta"))
            if d is not None:
                y = y + d.to(y.dtype)
        for cls, per_group in post:
            out = cls.routed("post", per_group, index, y, cache(cls, "post"))
            assert out is not None
            y = out
        return y

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self._state.routing
        if routing is not None:
            return self._routed_forward(routing, x, *args, **kwargs)
        pre, delta, post = self._active_units()
        for unit in pre:
            x = unit.pre(x)
        y = self.base_layer(x, *args, **kwargs)
        for unit in delta:
            # adapters may hold fp32 weights over a bf16/fp16 base: keep the base's output dtype,
            # as the routed path does, so the next frozen layer sees the dtype it computes in
            y = y + unit.delta(x).to(y.dtype)
        for unit in post:
            y = unit.post(y)
        return y

    # ---- merging -------------------------------------------------------------------
    def _base_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return base_weight(self.base_layer), base_bias(self.base_layer)

    def merge(self, adapter_names: list[str]) -> None:
        """Fold the named adapters into ``base_layer``'s weights, in forward order.

        Deltas go first, then pre/post rescaling, because the wrapped forward adds deltas
        before rescaling the output. Each result is checked to be finite before it is kept.
        """
        units = [(n, self.adapters[n]) for n in adapter_names if n in self.adapters]
        units = [(n, u) for n, u in units if n not in self.merged]
        if units and is_quantized(self.base_layer):
            reason = IN_PLACE_REFUSAL.format(scheme=module_scheme(self.base_layer))
            raise ValueError(f"cannot merge adapter {units[0][0]!r} in place: {reason}")
        order = {"delta": 0, "pre": 1, "post": 2}
        units.sort(key=lambda nu: (order[nu[1].stage], nu[1].post_order))  # type: ignore[index]
        for name, unit in units:
            assert isinstance(unit, AdapterUnit)
            if unit.stage != "delta":
                pending = [
                    n
                    for n in self._state.active
                    if n in self.adapters
                    and n not in self.merged
                    and n not in adapter_names
                    and self.adapters[n].stage == "delta"
                ]
                if pending:
                    raise ValueError(
                        f"cannot merge {name!r} into this module while {pending} stay unmerged: "
                        "their output would be rescaled differently; merge them together"
                    )
            weight, bias = self._base_params()
            new_w, new_b = unit.merged_weights(self.base_layer)
            if not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all()):
                raise ValueError(
                    f"merging adapter {name!r} would put NaN/inf into the base weights; "
                    "the adapter's parameters are not finite (check training)"
                )
            with torch.no_grad():
                weight.copy_(new_w)
                if bias is not None and new_b is not None:
                    bias.copy_(new_b)
            self.merged.append(name)
        self._cache_version = -1

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Undo merges in reverse order (all of them when ``adapter_names`` is None)."""
        targets = set(self.merged if adapter_names is None else adapter_names)
        # undo from the most recent merge back to the earliest named one
        while targets & set(self.merged):
            name = self.merged[-1]
            unit = self.adapters[name]
            assert isinstance(unit, AdapterUnit)
            weight, bias = self._base_params()
            new_w, new_b = unit.unmerged_weights(self.base_layer)
            with torch.no_grad():
                weight.copy_(new_w)
                if bias is not None and new_b is not None:
                    bias.copy_(new_b)
            self.merged.pop()
            targets.discard(name)
        self._cache_version = -1


class ModulesToSave(nn.Module):
    """A module (e.g. a classification head) trained and saved in full per adapter.

    ``original_module`` stays frozen; each adapter gets its own trainable copy in
    ``modules_to_save`` and the first active adapter that has one is used.
    """

    def __init__(self, original_module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._state = state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"original_module", "modules_to_save"}:
                raise
            return getattr(self.original_module, name)

    def add_copy(self, adapter_name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def current(self) -> nn.Module:
        if not self._state.disabled:
            for name in self._state.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def _module_for(self, names: tuple[str, ...]) -> nn.Module:
        return next(
            (self.modules_to_save[n] for n in names if n in self.modules_to_save), self.original_module
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = self._state.routing
        if routing is None:
            return self.current()(*args, **kwargs)
        # a head per group: each distinct copy runs on its own rows (heads are small)
        modules = [self._module_for(names) for names in routing.groups]
        if all(m is modules[0] for m in modules):
            return modules[0](*args, **kwargs)
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise ValueError(
                "per-sample adapters with different modules_to_save copies need the saved module to "
                "take one tensor argument"
            )
        x = args[0]
        index = routing.sample_index(x.shape[0], x.device)
        out: torch.Tensor | None = None
        for module in dict.fromkeys(modules):
            groups = [g for g, m in enumerate(modules) if m is module]
            rows = torch.isin(index, torch.tensor(groups, device=index.device)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = module(x.index_select(0, rows))
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        assert out is not None
        return out
