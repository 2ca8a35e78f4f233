"""compare's options are resolved once: ``--quick`` rules, sizes per run kind, what was given
winning over both, and every bad value refused before anything loads."""

from __future__ import annotations

import dataclasses

import pytest

from peftlab.compare.options import (
    QUICK_SIZES,
    QUICK_TASK,
    RUN_SIZES,
    CompareOptions,
    RunSizes,
    resolve_options,
)
from peftlab.training.preparation import MEMORY_BUDGET_BYTES


def test_defaults_are_the_run_kinds_sizes() -> None:
    opts = resolve_options(CompareOptions())
    assert (opts.task, opts.search, opts.latency_repeats) == ("rotten-tomatoes", "quick", 5)
    for kind, sizes in RUN_SIZES.items():
        assert RunSizes.resolve(opts, kind) == sizes
        assert sizes.memory_budget == MEMORY_BUDGET_BYTES


def test_quick_is_the_same_from_python_and_from_the_command_line() -> None:
    opts = resolve_options(CompareOptions(quick=True))
    assert (opts.task, opts.search, opts.latency_repeats) == (QUICK_TASK, "none", 2)
    sizes = RunSizes.resolve(opts, "generation")
    assert {k: getattr(sizes, k) for k in QUICK_SIZES} == QUICK_SIZES
    assert sizes.batch_size == RUN_SIZES["generation"].batch_size  # --quick leaves the batch
    # an encoder's quick run keeps its own default task; what was given wins over --quick
    encoder = resolve_options(CompareOptions(quick=True, model="minilm", search="full", latency_repeats=7))
    assert (encoder.task, encoder.search, encoder.latency_repeats) == ("rotten-tomatoes", "full", 7)


def test_given_sizes_win_and_steps_are_a_budget() -> None:
    opts = resolve_options(CompareOptions(quick=True, batch_size=4, steps=5, val_size=12, num_eval=3))
    sizes = RunSizes.resolve(opts, "causal-classification")
    assert (sizes.budget, sizes.batch_size, sizes.val_size, sizes.num_eval) == (20, 4, 12, 3)
    assert sizes.search_budget == min(QUICK_SIZES["search_budget"], 20)
    settings = sizes.settings()
    assert "memory_budget" not in settings and settings["budget"] == 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        sizes.budget = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ()}, "--methods: unknown empty list"),
        ({"methods": ("lora", "nope")}, r"--methods: unknown \['nope'\]"),
        ({"budget": 0}, "--budget must be >= 1, got 0"),
        ({"val_size": 2.5}, "--val-size must be an integer, got 2.5"),
        ({"search": "huge"}, "--search 'huge': choose one of none, quick, full"),
        ({"learning_rates": {"lora": float("inf")}}, "must be > 0 and finite"),
        ({"learning_rates": {"nope": 1e-3}}, "expected METHOD=LR with METHOD one of"),
        ({"task": "topic", "data": "x.jsonl"}, "give either --task or --data or --hf-dataset"),
        ({"eval_data": "e.jsonl"}, "--eval-data needs --data"),
        ({"eval_fraction": 1.0}, r"--eval-fraction must be in \(0, 1\)"),
        ({"budget": 8, "steps": 2}, "give either --budget or --steps, not both"),
    ],
)
def test_bad_options_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_options(CompareOptions(**changes))  # type: ignore[arg-type]
