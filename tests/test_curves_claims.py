"""Data-size curves and the lesson's claims: nested subsets, one budget rule, the crossover table
and order changes on cases whose answer is known, and each claim's verdict from hand-made
results (including "cannot tell" when the interval straddles the claim's range)."""

from __future__ import annotations

from typing import Any

import pytest

from peftlab.compare import claims
from peftlab.compare.curves import build_curves, order_changes, rise
from peftlab.compare.options import RUN_SIZES, CompareOptions, RunSizes, Unit, comparison_units

LABELS = {"full": "Full", "lora": "LoRA", "ia3": "IA3"}


def test_one_budget_rule_for_every_size() -> None:
    base = RUN_SIZES["causal-classification"]  # budget 720, batch 8
    small, middle, large = (base.for_train_size(n) for n in (64, 256, 1024))
    assert small.budget == 256  # 4 epochs of a small set
    assert middle.budget == 720  # the run's budget caps it
    assert large.budget == 1024  # but the largest set is seen once at least
    for sizes in (small, middle, large):
        assert sizes.budget % base.batch_size == 0 and sizes.search_budget <= sizes.budget
        assert (sizes.patience, sizes.val_size, sizes.num_eval) == (
            base.patience,
            base.val_size,
            base.num_eval,
        )
    assert RunSizes.for_train_size(base, 3).budget == base.batch_size  # at least one batch


def test_units_run_every_method_at_every_size_smallest_first() -> None:
    opts = CompareOptions(methods=("lora", "ia3"), sizes=(64, 256))
    assert [u.name for u in comparison_units(opts)] == ["lora@64", "ia3@64", "lora@256", "ia3@256"]
    assert [u.name for u in comparison_units(CompareOptions(methods=("lora",)))] == ["lora"]
    assert Unit("lora", 64).size == 64


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((256, 64), "sizes must increase"),
        ((64, 64), "sizes must increase"),
        ((0, 64), "integers >= 1"),
    ],
)
def test_bad_sizes(sizes: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompareOptions(sizes=sizes).validate()


def test_sizes_are_checked_against_the_split_and_the_batch() -> None:
    opts = CompareOptions(sizes=(64, 2048))
    with pytest.raises(
        ValueError, match="2,048 training examples asked for, but the training split holds 1,000"
    ):
        opts.check_sizes_against(1000, 8)
    with pytest.raises(ValueError, match="4 is below the batch size 8"):
        CompareOptions(sizes=(4, 64)).check_sizes_against(1000, 8)
    CompareOptions(sizes=(8, 1000)).check_sizes_against(1000, 8)


def test_order_changes_in_words() -> None:
    sizes = [64, 256, 1024]
    relations = {
        64: {("lora", "ia3"): "b", ("full", "lora"): "a"},
        256: {("lora", "ia3"): "b", ("full", "lora"): "a"},
        1024: {("lora", "ia3"): "tied", ("full", "lora"): "a"},
    }
    assert order_changes(sizes, relations, LABELS) == ["IA3 ahead of LoRA up to 256 examples; tied at 1,024"]
    relations[256][("full", "lora")] = "tied"
    relations[1024][("full", "lora")] = "b"
    changes = order_changes(sizes, relations, LABELS)
    assert changes[1] == "Full ahead of LoRA at 64 examples; tied at 256; LoRA ahead of Full at 1,024"


def _row(method: str, mean: float, tied: bool, best: bool = False) -> dict[str, Any]:
    return {
        "method": method,
        "quality": {"mean": mean, "ci_low": mean - 0.05, "ci_high": mean + 0.05, "n": 1, "std": 0.0},
        "tied_with_best": tied,
        "is_best": best,
        "examples_seen": 100,
        "learning_rate": 1e-3,
    }


def test_curves_name_the_best_and_its_ties_per_size() -> None:
    rows = {
        64: [_row("lora", 0.60, True), _row("ia3", 0.70, True, best=True)],
        256: [_row("lora", 0.80, True, best=True), _row("ia3", 0.72, False)],
    }
    relations = {64: {("lora", "ia3"): "tied"}, 256: {("lora", "ia3"): "a"}}
    curves = build_curves([64, 256], rows, relations, "accuracy", LABELS)
    assert curves["per_size"] == [
        {"size": 64, "best": "ia3", "tied": ["lora", "ia3"]},
        {"size": 256, "best": "lora", "tied": ["lora"]},
    ]
    assert [p["quality"]["mean"] for p in curves["methods"]["ia3"]] == [0.70, 0.72]
    assert curves["order_changes"] == ["LoRA and IA3 tied at 64 examples; LoRA ahead of IA3 at 256"]
    assert curves["rises"]["lora"]["rises"] and curves["rises"]["ia3"]["rises"]


def test_a_curve_that_does_not_rise_says_why() -> None:
    points = [
        {"size": 64, "quality": {"mean": 0.70, "ci_low": 0.6, "ci_high": 0.8}},
        {"size": 256, "quality": {"mean": 0.68, "ci_low": 0.6, "ci_high": 0.76}, "lr_at_edge": "largest"},
    ]
    said = rise(points)
    assert (
        not said["rises"]
        and "intervals overlap" in said["why_not"]
        and "edge of the search" in said["why_not"]
    )


# ---- the claims, from hand-made results ------------------------------------------------------
def _results(**paired: tuple[float, float, float]) -> dict[str, Any]:
    rows = [
        {"method": "lora", "label": "LoRA", "trainable_params": 460_800, "mergeable": True},
        {"method": "ia3", "label": "IA3", "trainable_params": 76_800, "mergeable": True},
    ]
    return {
        "model_kind": "causal",
        "methods": rows,
        "paired": {k: {"value": v, "ci_low": lo, "ci_high": hi} for k, (v, lo, hi) in paired.items()},
    }


@pytest.mark.parametrize(
    ("gap", "verdict"),
    [
        ((0.05, 0.035, 0.07), claims.HOLDS),
        ((0.20, 0.15, 0.25), claims.FAILS),
        ((-0.05, -0.08, -0.01), claims.FAILS),
        ((0.05, -0.02, 0.12), claims.UNSURE),  # straddles the range
    ],
)
def test_ia3_gap_verdicts(gap: tuple[float, float, float], verdict: str) -> None:
    claim = claims.ia3_below_lora(_results(ia3_gap_to_lora=gap))
    assert claim["verdict"] == verdict and claim["interval"] == [gap[1], gap[2]]


def test_claims_that_the_run_cannot_speak_to_are_not_measured() -> None:
    results = _results()
    assert claims.ia3_below_lora(results)["verdict"] == claims.UNMEASURED
    assert claims.lora_all_closes_gap(results)["verdict"] == claims.UNMEASURED
    assert claims.adapters_slower(results)["verdict"] == claims.UNMEASURED
    assert claims.ia3_best_with_few_examples(results)["verdict"] == claims.UNMEASURED
    results["model_kind"] = "encoder"
    assert (
        claims.prefix_below_lora(_results(lora_minus_prefix=(0.1, 0.05, 0.15)) | {"model_kind": "encoder"})[
            "verdict"
        ]
        == claims.UNMEASURED
    )


def test_parameter_ratio_and_prefix_claims() -> None:
    results = _results(lora_minus_prefix=(0.1, 0.05, 0.15), lora_all_share_of_gap=(0.6, 0.55, 0.65))
    assert claims.ia3_fewer_params(results)["verdict"] == claims.HOLDS  # 6.0x
    results["methods"][1]["trainable_params"] = 57_600  # 8.0x: not "about 6x"
    assert claims.ia3_fewer_params(results)["verdict"] == claims.FAILS
    assert claims.prefix_below_lora(results)["verdict"] == claims.HOLDS
    assert claims.lora_all_closes_gap(results)["verdict"] == claims.HOLDS
    flipped = _results(lora_minus_prefix=(-0.1, -0.15, -0.05))
    assert claims.prefix_below_lora(flipped)["verdict"] == claims.FAILS


def test_timing_claims_and_contention() -> None:
    row = {
        "method": "bottleneck",
        "label": "Bottleneck",
        "trainable_params": 1,
        "mergeable": False,
        "inference_overhead_unmerged": 1.10,
        "inference_spread_unmerged": {"min": 1.06, "max": 1.14},
        "inference_machine": {"contended": False, "other_cpu_share": 0.01},
    }
    results = {"methods": [row], "paired": {}}
    assert claims.adapters_slower(results)["verdict"] == claims.HOLDS
    row["inference_spread_unmerged"] = {"min": 0.60, "max": 0.70}  # impossibly fast: outside the range
    assert claims.adapters_slower(results)["verdict"] == claims.FAILS
    row["inference_machine"] = {"contended": True, "other_cpu_share": 0.4}
    said = claims.adapters_slower(results)
    assert said["verdict"] == claims.UNSURE and "other work used 40%" in said["measured"]
    merged = {
        "method": "lora",
        "label": "LoRA",
        "mergeable": True,
        "inference_overhead_merged": 1.0,
        "inference_spread_merged": {"min": 0.98, "max": 1.02},
        "inference_machine": {"contended": False},
    }
    assert claims.merged_costs_nothing({"methods": [merged]})[0]["verdict"] == claims.HOLDS
    merged["inference_spread_merged"] = {"min": 0.95, "max": 1.01}
    assert claims.merged_costs_nothing({"methods": [merged]})[0]["verdict"] == claims.UNSURE


def test_ia3_with_few_examples_from_the_curves() -> None:
    def results(tied: list[str], best: str) -> dict[str, Any]:
        per_size = [
            {"size": 64, "best": best, "tied": tied},
            {"size": 1024, "best": "lora", "tied": ["lora"]},
        ]
        return {"curves": {"per_size": per_size, "methods": {"ia3": [], "lora": []}}}

    assert claims.ia3_best_with_few_examples(results(["ia3"], "ia3"))["verdict"] == claims.HOLDS
    assert claims.ia3_best_with_few_examples(results(["lora", "ia3"], "lora"))["verdict"] == claims.UNSURE
    assert claims.ia3_best_with_few_examples(results(["lora"], "lora"))["verdict"] == claims.FAILS
