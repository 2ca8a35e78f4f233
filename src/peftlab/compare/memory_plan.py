"""Each method's memory plan in a comparison, made before it trains and kept in the store.

A method's estimate (:mod:`peftlab.training.memory`: weights, gradients, AdamW state and
activations at the run's batch, lengths and precision) is held against what the device has:
CUDA's free memory or the CPU's available RAM, plus the base's weights where the method trains
on the one loaded base (they are in the estimate and already in memory), or ``--max-memory``.
What does not fit at the whole batch trains in micro-batches whose gradients accumulate (every
method still sees the same examples per optimizer step and in total), then with activation
checkpointing where the method allows it (:class:`~peftlab.training.memory.MemoryPlanner`).
An out-of-memory error halves the micro-batch again; the plan in force is in the store, so a
resumed comparison (and every worker) trains each method with the plan it came to.
"""

from __future__ import annotations

from typing import Any

from peftlab.compare.inputs import ComparisonInputs
from peftlab.compare.measure import method_estimate
from peftlab.compare.session import SharedBase
from peftlab.compare.store import Store
from peftlab.core.peft_model import count_parameters, get_peft_model
from peftlab.presets import PRESETS, MethodPreset
from peftlab.training.memory import (
    GIB,
    MemoryPlan,
    MemoryPlanner,
    available_bytes,
    build_meta_model,
    gib,
    weight_bytes,
)

PLAN_RECORD = "__memory_plan__:"  # + the method's name: the store's record of its plan


def method_counts(inputs: ComparisonInputs, preset: MethodPreset) -> tuple[int, int]:
    """(trainable, total) parameters of ``preset`` on the comparison's base, counted on the meta
    device (nothing allocated, the loaded base untouched)."""
    base = inputs.base
    if preset.method is None:
        _, total = count_parameters(base)
        return total, total
    meta = build_meta_model(base.config, type(base))
    config = preset.config(base.config, inputs.task_type)
    assert config is not None  # only full fine-tuning has none
    return count_parameters(get_peft_model(meta, config))


class ComparisonPlans:
    """The planners of one comparison's methods (counts made once per method) and the plans
    the store remembers. ``bases``: the bases in memory, whose weights a method training on one
    of them does not need again."""

    def __init__(self, bases: SharedBase, max_memory_gib: float | None) -> None:
        self.inputs = bases.inputs
        self.bases = bases
        self.max_memory_gib = max_memory_gib
        self.max_memory = None if max_memory_gib is None else int(max_memory_gib * GIB)
        self.counts: dict[str, tuple[int, int]] = {}

    def can_checkpoint(self, preset: MethodPreset) -> bool:
        base_can = bool(getattr(self.inputs.base, "supports_gradient_checkpointing", False))
        return base_can and preset.supports_activation_checkpointing

    def budget(self, preset: MethodPreset) -> int | None:
        """What the method's estimate must fit in: ``--max-memory``, or what the device has now
        plus the weights of the loaded base the method would train on."""
        if self.max_memory is not None:
            return self.max_memory
        free = available_bytes(self.inputs.precision.device)
        if free is None:
            return None
        if preset.method is None:  # full fine-tuning loads the weights again
            return free
        base = self.inputs.base if preset.quantize is None else self.bases.quantized.get(preset.quantize)
        return free + (weight_bytes(base) if base is not None else 0)

    def planner(self, preset: MethodPreset, budget: int | None = None) -> MemoryPlanner:
        if preset.name not in self.counts:
            self.counts[preset.name] = method_counts(self.inputs, preset)
        trainable, total = self.counts[preset.name]

        def estimate(micro_batch: int, checkpointing: bool) -> int:
            return method_estimate(
                self.inputs, preset, trainable, total, micro_batch=micro_batch, checkpointing=checkpointing
            ).total

        available = self.budget(preset) if budget is None else budget
        return MemoryPlanner(estimate, self.inputs.sizes.batch_size, available, self.can_checkpoint(preset))

    def check_max_memory(self, methods: tuple[str, ...]) -> None:
        """``--max-memory`` below what even the least demanding method needs at one example per
        micro-batch (checkpointing where it can) is refused before anything trains."""
        if self.max_memory is None:
            return
        least = {m: self.planner(PRESETS[m]).smallest() for m in methods}
        name, plan = min(least.items(), key=lambda item: item[1].needed_bytes)
        if plan.needed_bytes > self.max_memory:
            how = "one example at a time" + (" with activation checkpointing" if plan.checkpointing else "")
            raise ValueError(
                f"--max-memory {self.max_memory_gib:g}: no method fits; the least demanding, {name}, "
                f"needs about {gib(plan.needed_bytes)} ({how}); give at least --max-memory "
                f"{plan.needed_bytes / GIB:.3g}"
            )

    def plan(self, store: Store, preset: MethodPreset) -> tuple[MemoryPlan, MemoryPlanner]:
        """The method's plan: the store's (a resumed comparison, another worker, an earlier
        out-of-memory error), else a new one from its estimate, written to the store."""
        saved = store.get_record(PLAN_RECORD + preset.name, 0)
        if saved is not None:
            plan = MemoryPlan.from_dict(saved)
            return plan, self.planner(preset, plan.available_bytes)
        planner = self.planner(preset)
        plan = planner.first()
        remember(store, preset, plan)
        return plan, planner


def remember(store: Store, preset: MethodPreset, plan: MemoryPlan) -> None:
    store.put_record(PLAN_RECORD + preset.name, 0, plan.to_dict())


def does_not_fit_record(plan: MemoryPlan, seed: int, finished_at: float) -> dict[str, Any]:
    """The record of a method that does not fit (in place of a run's)."""
    return {
        "seed": seed,
        "does_not_fit": plan.to_dict(),
        "reason": plan.refusal(),
        "finished_at": finished_at,
    }
