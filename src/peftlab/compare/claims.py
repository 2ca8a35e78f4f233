"""The lesson's quantitative claims, checked on this run: each beside the measured value, its
interval and a verdict.

Verdicts: *holds* (the interval lies inside the claim's range, or on its side of zero),
*does not hold* (the interval lies wholly outside), *cannot tell at this sample size* (the
interval straddles a bound of the range, or a timing was taken while other work competed for
the cores), *not measured in this run* (the methods or sizes it needs were not run). Quality
intervals are 95% paired bootstraps over the test examples (``results["paired"]``, from
:mod:`peftlab.compare.results`); timing intervals are the range of the per-repeat ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HOLDS = "holds"
FAILS = "does not hold"
UNSURE = "cannot tell at this sample size"
UNMEASURED = "not measured in this run"
ADAPTER_OVERHEAD = (0.05, 0.15)  # "adapters add 5-15% latency" (unmerged)
IA3_GAP = (0.03, 0.08)  # "IA3 typically 3-8% below LoRA"
LORA_ALL_SHARE = (0.50, 0.70)  # "r=16 all-linear closes 50-70% of the gap to full fine-tuning"
IA3_PARAMS_RATIO = 6.0  # "about 6x fewer trainable parameters than LoRA r=8"
ABOUT = 0.25  # "about": within 25%
MERGED_NO_COST = (0.97, 1.03)  # merged = the base's work: 1.00 within timing noise
FEW_EXAMPLES = 200  # "fewer than 200 training examples: IA3"


def range_verdict(low: float, high: float, bounds: tuple[float, float]) -> str:
    """The verdict for an interval [low, high] against a claimed range."""
    if low != low or high != high:  # NaN: the quantity is undefined on this run
        return UNSURE
    if bounds[0] <= low and high <= bounds[1]:
        return HOLDS
    if high < bounds[0] or low > bounds[1]:
        return FAILS
    return UNSURE


def positive_verdict(low: float, high: float) -> str:
    """The verdict for "the quantity is above zero"."""
    return range_verdict(low, high, (0.0, float("inf")))


def _claim(
    claim: str, measured: str, verdict: str, interval: Sequence[float] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "claim": claim,
        "measured": measured,
        "interval": list(interval) if interval else None,
        "verdict": verdict,
        **extra,
    }


def _rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in results["methods"]}


def ia3_below_lora(results: dict[str, Any]) -> dict[str, Any]:
    claim = "IA³ scores typically 3–8% below LoRA"
    gap = results.get("paired", {}).get("ia3_gap_to_lora")
    if gap is None:
        return _claim(claim, "needs lora and ia3", UNMEASURED)
    lo, hi = gap["ci_low"], gap["ci_high"]
    return _claim(
        claim, f"IA³ {gap['value']:+.1%} below LoRA (relative)", range_verdict(lo, hi, IA3_GAP), (lo, hi)
    )


def lora_all_closes_gap(results: dict[str, Any]) -> dict[str, Any]:
    claim = "LoRA r=16 on all linear layers closes 50–70% of the gap from LoRA r=8 to full fine-tuning"
    share = results.get("paired", {}).get("lora_all_share_of_gap")
    if share is None:
        return _claim(claim, "needs full, lora and lora-all", UNMEASURED)
    lo, hi = share["ci_low"], share["ci_high"]
    return _claim(
        claim, f"closes {share['value']:.0%} of the gap", range_verdict(lo, hi, LORA_ALL_SHARE), (lo, hi)
    )


def prefix_below_lora(results: dict[str, Any]) -> dict[str, Any]:
    claim = "prefix tuning scores below LoRA on a causal LM"
    diff = results.get("paired", {}).get("lora_minus_prefix")
    if diff is None or results.get("model_kind") != "causal":
        return _claim(claim, "needs lora and prefix on a causal LM", UNMEASURED)
    lo, hi = diff["ci_low"], diff["ci_high"]
    return _claim(claim, f"LoRA − prefix = {diff['value']:+.3f}", positive_verdict(lo, hi), (lo, hi))


def ia3_fewer_params(results: dict[str, Any]) -> dict[str, Any]:
    claim = "IA³ trains about 6x fewer parameters than LoRA r=8"
    rows = _rows(results)
    if "ia3" not in rows or "lora" not in rows:
        return _claim(claim, "needs lora and ia3", UNMEASURED)
    ratio = rows["lora"]["trainable_params"] / rows["ia3"]["trainable_params"]
    band = (IA3_PARAMS_RATIO * (1 - ABOUT), IA3_PARAMS_RATIO * (1 + ABOUT))
    verdict = HOLDS if band[0] <= ratio <= band[1] else FAILS
    return _claim(claim, f"{ratio:.1f}x fewer (exact counts)", verdict, None)


def _timing_verdict(
    spread: dict[str, Any] | None, machine: dict[str, Any] | None, bounds: tuple[float, float]
) -> tuple[str, list[float] | None, str]:
    if not spread:
        return UNMEASURED, None, ""
    lo, hi = spread["min"], spread["max"]
    if machine and machine.get("contended"):
        share = machine.get("other_cpu_share") or 0.0
        return UNSURE, [lo, hi], f"; timed while other work used {share:.0%} of the CPUs"
    return range_verdict(lo, hi, bounds), [lo, hi], ""


def adapters_slower(results: dict[str, Any]) -> dict[str, Any]:
    claim = "bottleneck adapters are 5–15% slower at inference (unmerged)"
    row = _rows(results).get("bottleneck")
    if row is None:
        return _claim(claim, "needs bottleneck", UNMEASURED)
    spread = row.get("inference_spread_unmerged")
    bounds = (1 + ADAPTER_OVERHEAD[0], 1 + ADAPTER_OVERHEAD[1])
    verdict, interval, note = _timing_verdict(spread, row.get("inference_machine"), bounds)
    measured = f"{row['inference_overhead_unmerged'] - 1:+.1%} latency" + note
    return _claim(claim, measured, verdict, interval)


def merged_costs_nothing(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in results["methods"]:
        if (
            not row.get("mergeable")
            or row["method"] == "full"
            or row.get("inference_overhead_merged") is None
        ):
            continue
        claim = f"{row['label']} merged costs nothing at inference"
        verdict, interval, note = _timing_verdict(
            row.get("inference_spread_merged"), row.get("inference_machine"), MERGED_NO_COST
        )
        measured = f"{row['inference_overhead_merged']:.2f}x the base's latency" + note
        out.append(_claim(claim, measured, verdict, interval))
    if not out:
        out.append(
            _claim("mergeable methods cost nothing at inference once merged", "needs lora or ia3", UNMEASURED)
        )
    return out


def ia3_best_with_few_examples(results: dict[str, Any]) -> dict[str, Any]:
    claim = f"IA³ is the best choice below {FEW_EXAMPLES} training examples"
    curves = results.get("curves")
    small = [p for p in (curves or {}).get("per_size", []) if p["size"] < FEW_EXAMPLES]
    if not small or "ia3" not in (curves or {}).get("methods", {}):
        return _claim(claim, f"needs --sizes with a size below {FEW_EXAMPLES} and ia3", UNMEASURED)
    verdicts = [HOLDS if "ia3" in p["tied"] else FAILS for p in small]
    said = "; ".join(
        f"at {p['size']:,}: "
        + ("IA³ best or tied with the best" if "ia3" in p["tied"] else f"{p['best']} ahead of IA³")
        for p in small
    )
    if all(v == HOLDS for v in verdicts):
        lone = all(p["tied"] == ["ia3"] for p in small)
        return _claim(
            claim, said, HOLDS if lone else UNSURE, None, note=None if lone else "tied: IA³ is not ahead"
        )
    return _claim(claim, said, FAILS, None)


def check_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim this run can speak to (see the module docstring)."""
    return [
        ia3_below_lora(results),
        adapters_slower(results),
        lora_all_closes_gap(results),
        ia3_fewer_params(results),
        prefix_below_lora(results),
        *merged_costs_nothing(results),
        ia3_best_with_few_examples(results),
    ]


def claim_lines(results: dict[str, Any]) -> list[str]:
    """The report's section: one row per claim."""
    rows = []
    for c in results.get("claims", []):
        interval = "-" if c["interval"] is None else f"[{c['interval'][0]:.3g}, {c['interval'][1]:.3g}]"
        rows.append(f"| {c['claim']} | {c['measured']} | {interval} | {c['verdict']} |")
    return [
        "Each quantitative claim of the lesson this run can test, beside what it measured. Quality "
        "intervals: 95% paired bootstrap over the test examples; timing intervals: the range of the "
        "per-repeat ratios. Holds = the interval lies inside the claimed range; does not hold = wholly "
        "outside; cannot tell = it straddles a bound (or the timing was taken under contention).",
        "",
        "| Claim (the lesson) | Measured | Interval | Verdict |",
        "|---|---|---|---|",
        *rows,
    ]
