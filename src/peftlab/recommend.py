"""The lesson's method decision as code, optionally overridden by measured ``compare`` results.

Rules of thumb (from the PEFT comparison lesson), applied in order:

1. Default to LoRA (r=8 on the query and value projections, alpha=16).
2. Fewer than 200 training examples, or a memory budget too tight for LoRA → IA3.
3. Many tasks composed with strict layer-level isolation → bottleneck adapters, unless zero
   inference overhead is required (adapters cannot be merged).
4. Sequence-to-sequence models → prefix tuning is a candidate (not when zero overhead is required).
5. Zero inference overhead required → only mergeable methods (LoRA, IA3).

With ``results`` from ``peftlab compare``, the measured quality and cost decide among the
methods that satisfy the hard constraints; the rules only break near-ties.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.presets import PRESETS

MODEL_TYPES = ("causal", "seq2seq", "encoder")
FEW_EXAMPLES = 200
MERGEABLE = {name for name, preset in PRESETS.items() if "mergeable" in preset.traits}


@dataclass(frozen=True)
class Constraints:
    num_examples: int | None = None
    model_type: str = "causal"
    memory_budget_gb: float | None = None
    # memory LoRA training needs on this model (from `peftlab count`), to test the budget against
    lora_memory_gb: float | None = None
    num_tasks: int = 1
    zero_overhead: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"number of examples must be >= 1, got {self.num_examples}")
        if self.num_tasks < 1:
            raise ValueError(f"number of tasks must be >= 1, got {self.num_tasks}")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ValueError(f"memory budget must be > 0 GB, got {self.memory_budget_gb}")


@dataclass
class Recommendation:
    method: str
    settings: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"recommended method: {self.method}"]
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        if self.candidates:
            lines.append("also worth trying: " + ", ".join(self.candidates))
        lines.append("because:")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def recommend(constraints: Constraints, results: dict[str, Any] | None = None) -> Recommendation:
    rules = _by_rules(constraints)
    if results is None:
        return rules
    return _by_measurement(constraints, results, rules)


def _tight_memory(c: Constraints) -> bool:
    return (
        c.memory_budget_gb is not None
        and c.lora_memory_gb is not None
        and c.lora_memory_gb > c.memory_budget_gb
    )


def _by_rules(c: Constraints) -> Recommendation:
    reasons: list[str] = []
    candidates: list[str] = []
    if c.num_examples is not None and c.num_examples < FEW_EXAMPLES:
        reasons.append(
            f"{c.num_examples} training examples (< {FEW_EXAMPLES}): IA3's tiny parameter count "
            "limits overfitting"
        )
        method = "ia3"
    elif _tight_memory(c):
        reasons.append(
            f"memory budget {c.memory_budget_gb:g} GB is below LoRA's estimated "
            f"{c.lora_memory_gb:.1f} GB: IA3 trains the fewest parameters"
        )
        method = "ia3"
    elif c.num_tasks > 1 and not c.zero_overhead:
        reasons.append(
            f"{c.num_tasks} tasks to compose: bottleneck adapters stack per layer with strict "
            "isolation between tasks"
        )
        method = "bottleneck"
        candidates.append("lora")
    elif c.model_type == "seq2seq" and not c.zero_overhead:
        reasons.append("sequence-to-sequence model: prefix tuning was designed for it")
        method = "prefix"
        candidates.append("lora")
    else:
        reasons.append("LoRA (r=8 on q and v) is the default that works for most tasks")
        method = "lora"
        candidates.append("lora-all")
        reasons.append("if quality falls short, r=16 on all linear layers usually closes much of the gap")
    if c.zero_overhead:
        reasons.append(
            "zero inference overhead required: only mergeable methods (LoRA, IA3) qualify; "
            "bottleneck adapters and prefix tuning cannot be merged"
        )
        candidates = [m for m in candidates if m in MERGEABLE]
    if c.num_tasks > 1 and method in MERGEABLE:
        reasons.append(
            f"{c.num_tasks} tasks can share one base model: peftlab serves one adapter per request"
        )
    return Recommendation(method, PRESETS[method].settings(), reasons, candidates)


def _by_measurement(c: Constraints, results: dict[str, Any], rules: Recommendation) -> Recommendation:
    rows = results.get("methods")
    if not isinstance(rows, list) or not rows:
        raise ValueError(
            "results file has no 'methods' list; pass the results.json written by peftlab compare"
        )
    budget = c.memory_budget_gb * 1e9 if c.memory_budget_gb is not None else None
    usable: list[dict[str, Any]] = []
    rejected: list[str] = []
    for row in rows:
        name = str(row.get("method"))
        if c.zero_overhead and not row.get("mergeable", name in MERGEABLE):
            rejected.append(f"{name} (cannot be merged)")
            continue
        peak = row.get("peak_memory_bytes")
        if budget is not None and isinstance(peak, (int, float)) and peak > budget:
            rejected.append(f"{name} (measured peak {peak / 1e9:.2f} GB > budget)")
            continue
        if _quality(row) is None:
            rejected.append(f"{name} (no quality measured)")
            continue
        usable.append(row)
    if not usable:
        reasons = [*rules.reasons, "no measured method met the constraints: " + ", ".join(rejected)]
        return Recommendation(rules.method, rules.settings, reasons, rules.candidates)
    best = max(usable, key=lambda r: _quality(r) or 0.0)
    best_q = _quality(best) or 0.0
    tested = all("tied_with_best" in r for r in usable)
    if tested:
        # a paired significance test against the best method decided who is tied with it
        close = [r for r in usable if r is best or r.get("tied_with_best")]
    else:
        spread = max(_spread(best), 1e-9)
        close = [r for r in usable if (_quality(r) or 0.0) >= best_q - spread]
    # among methods the measurements cannot tell apart, prefer the rule's choice, then the cheapest
    by_rule = [r for r in close if r.get("method") == rules.method]
    chosen = by_rule[0] if by_rule else min(close, key=lambda r: r.get("trainable_params") or 0)
    name = str(chosen.get("method"))
    margin = (
        "statistically tied methods: " + ", ".join(str(r.get("method")) for r in close)
        if tested
        else f"spread ±{_spread(best):.3f}"
    )
    reasons = [
        f"measured quality {(_quality(chosen) or 0.0):.3f} (best {best_q:.3f} by {best.get('method')}; "
        f"{margin})"
    ]
    if chosen is not best:
        reasons.append(
            "tied with the best method (no significant difference), so the cheaper or rule-preferred "
            "method is chosen"
            if tested
            else "within the best method's spread, so the cheaper or rule-preferred method is chosen"
        )
    if rejected:
        reasons.append("excluded: " + ", ".join(rejected))
    reasons += [f"rule of thumb: {r}" for r in rules.reasons]
    settings = dict(row_settings(chosen) or (PRESETS[name].settings() if name in PRESETS else {}))
    others = [str(r.get("method")) for r in close if r is not chosen]
    return Recommendation(name, settings, reasons, others)


def row_settings(row: dict[str, Any]) -> dict[str, Any] | None:
    value = row.get("config")
    return value if isinstance(value, dict) else None


def _quality(row: dict[str, Any]) -> float | None:
    q = row.get("quality")
    if isinstance(q, dict):
        q = q.get("mean")
    return float(q) if isinstance(q, (int, float)) else None


def _spread(row: dict[str, Any]) -> float:
    q = row.get("quality")
    if isinstance(q, dict) and isinstance(q.get("std"), (int, float)):
        return float(q["std"])
    return 0.0


def load_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such results file; run peftlab compare --out DIR first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err}); pass the results.json written by compare") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object as written by peftlab compare")
    return data
