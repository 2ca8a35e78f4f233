"""The lesson's method decision as code, optionally overridden by measured ``compare`` results.

Rules of thumb (from the PEFT comparison lesson), applied in order:

1. Default to LoRA (r=8 on the query and value projections, alpha=16).
2. Fewer than 200 training examples, or a memory budget too tight for LoRA → IA3.
3. Many tasks composed with strict layer-level isolation → bottleneck adapters, unless zero
   inference overhead is required (adapters cannot be merged).
4. Sequence-to-sequence models → prefix tuning is a candidate (not when zero overhead is required).
5. Zero inference overhead required → only mergeable methods (LoRA, IA3).

Measurements from ``peftlab compare`` replace the rules, the most specific first:

- **A measured curve** (``compare --sizes``: every method trained at several training-set sizes)
  and a known number of examples N: the measured size nearest to N on a log scale decides (quality
  follows the ratio of dataset sizes, not their difference), replacing rule 2's fixed threshold
  with what was measured on this task. Its best method is recommended; the methods compare's
  paired test could not tell from the best (p >= 0.05) are kept as ties, not ranked.
- **Measured methods** (results without curves, or N unknown): measured quality and cost decide
  among the methods; the rules only break near-ties.

Either way the hard constraints come first: zero inference overhead admits only mergeable methods,
a memory budget only methods whose measured peak fits it. :attr:`Recommendation.source` says what
decided: ``"curve"``, ``"results"`` or ``"rules"``.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from peftlab.models import MODEL_KINDS, model_kind
from peftlab.presets import PRESETS

MODEL_TYPES = MODEL_KINDS  # as peftlab.models.model_kind tells them from a model's config
FEW_EXAMPLES = 200
MERGEABLE = {name for name, preset in PRESETS.items() if "mergeable" in preset.traits}
# what compare's "tied_with_best" means (peftlab.compare.stats: McNemar or paired bootstrap)
TIE_MEANING = "no significant difference from the best in compare's paired test, p >= 0.05"
RULES_BASIS = "the lesson's rule"


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
    """The method to use and why. ``source`` is what decided (``"curve"``, ``"results"`` or
    ``"rules"``) and ``basis`` the same in words; ``curve_size`` is the measured training-set size
    read (curve only) and ``tied`` the methods measured as equally good there."""

    method: str
    settings: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)
    source: str = "rules"
    basis: str = RULES_BASIS
    curve_size: int | None = None
    tied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"recommended method: {self.method}", f"decided by: {self.basis}"]
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        if self.tied and self.curve_size is not None:
            lines.append(f"equally good at {self.curve_size:,} examples (tied): " + ", ".join(self.tied))
        if self.candidates:
            lines.append("also worth trying: " + ", ".join(self.candidates))
        lines.append("because:")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


@dataclass(frozen=True)
class SizePoint:
    """One training-set size of compare's curves: each method's quality summary there (``mean``,
    ``ci_low``, ``ci_high``, ...), the best method and the methods tied with it (the best included)."""

    size: int
    quality: dict[str, dict[str, Any]]
    best: str
    tied: tuple[str, ...]


@dataclass(frozen=True)
class Curves:
    """compare's data-size curves (``results["curves"]``), checked: sizes increasing, every
    method measured at every size, one verdict per size."""

    metric: str
    points: tuple[SizePoint, ...]
    order_changes: tuple[str, ...]

    @property
    def sizes(self) -> list[int]:
        return [p.size for p in self.points]


def recommend(constraints: Constraints, results: dict[str, Any] | None = None) -> Recommendation:
    """The recommendation for ``constraints``: from the measured curve at the number of examples
    when ``results`` hold curves and that number is known, else from the measured methods, else
    from the lesson's rules. Malformed curves raise ``ValueError`` even when unused, so a broken
    results file is noticed before it is relied on."""
    rules = _by_rules(constraints)
    if results is None:
        return rules
    curves = read_curves(results)
    if curves is None:
        return _by_measurement(constraints, results, rules)
    if constraints.num_examples is not None:
        return _by_curve(constraints, constraints.num_examples, curves, results, rules)
    if not isinstance(results.get("methods"), list):
        raise ValueError(
            "the results hold only curves: give the number of training examples (--examples N) to read them"
        )
    rec = _by_measurement(constraints, results, rules)
    rec.reasons.append(
        f"the results also hold curves at {_sizes_text(curves.sizes)} examples: give the number of "
        "training examples (--examples N) to decide from the curve"
    )
    return rec


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
        candidates += ["prefix-all", "lora"]
        reasons.append(
            "prefix-all adds prefixes to the encoder and the cross-attention too (the paper's BART "
            "setting); `peftlab compare` on your model measures both layouts"
        )
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


def _excluded_by(c: Constraints, name: str, row: dict[str, Any]) -> str | None:
    """Why a hard constraint rules ``name`` out (its measured ``row`` may be empty), or None.
    Without a measured ``mergeable`` flag the preset's trait decides."""
    if c.zero_overhead and not row.get("mergeable", name in MERGEABLE):
        return f"{name} (cannot be merged)"
    peak = row.get("peak_memory_bytes")
    if c.memory_budget_gb is not None and isinstance(peak, (int, float)) and peak > c.memory_budget_gb * 1e9:
        return f"{name} (measured peak {peak / 1e9:.2f} GB > budget)"
    return None


def _fallback(rules: Recommendation, why: str) -> Recommendation:
    """The rules' recommendation when no measured method met the constraints, saying so."""
    reasons = [*rules.reasons, f"no measured method met the constraints: {why}"]
    basis = f"{RULES_BASIS} (no measured method met the constraints)"
    return Recommendation(rules.method, rules.settings, reasons, rules.candidates, basis=basis)


def _by_measurement(c: Constraints, results: dict[str, Any], rules: Recommendation) -> Recommendation:
    rows = results.get("methods")
    if not isinstance(rows, list) or not rows:
        raise ValueError(
            "results file has no 'methods' list; pass the results.json written by peftlab compare"
        )
    usable: list[dict[str, Any]] = []
    rejected: list[str] = []
    for row in rows:
        name = str(row.get("method"))
        why = _excluded_by(c, name, row)
        if why is None and _quality(row) is None:
            why = f"{name} (no quality measured)"
        if why is not None:
            rejected.append(why)
            continue
        usable.append(row)
    if not usable:
        return _fallback(rules, ", ".join(rejected))
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
    others = [str(r.get("method")) for r in close if r is not chosen]
    basis = "measured results of each method (peftlab compare)"
    return Recommendation(name, _settings(name, chosen), reasons, others, source="results", basis=basis)


def _by_curve(
    c: Constraints, n: int, curves: Curves, results: dict[str, Any], rules: Recommendation
) -> Recommendation:
    """The best method at the measured size nearest to ``n`` training examples among those the hard
    constraints allow; the methods tied with the best there are kept as ties. Memory and
    mergeability come from the results' method rows where present (else the presets)."""
    size, where = nearest_size(curves.sizes, n)
    point = curves.points[curves.sizes.index(size)]
    rows = _rows_by_method(results)
    usable, rejected = _usable_at(c, point, rows)
    if not usable:
        return _fallback(rules, f"at {size:,} examples: " + ", ".join(rejected))
    chosen = point.best if point.best in usable else max(usable, key=lambda m: _mean(point.quality[m]) or 0.0)
    tied = [m for m in point.tied if m in usable and m != chosen]
    reasons = [*_curve_reasons(curves.metric, point, chosen, tied), *([where] if where else [])]
    reasons += [f"measured: {change}" for change in curves.order_changes]
    if rejected:
        reasons.append("excluded: " + ", ".join(rejected))
    if rules.method != chosen:
        reasons.append(
            f"the lesson's rule would pick {rules.method} ({rules.reasons[0]}); the curve replaces it"
        )
    basis = f"measured curve at {size:,} examples " + (f"(N={n})" if size == n else f"(nearest to N={n})")
    settings = _settings(chosen, rows.get(chosen, {}))
    return Recommendation(
        chosen, settings, reasons, [], source="curve", basis=basis, curve_size=size, tied=tied
    )


def _usable_at(
    c: Constraints, point: SizePoint, rows: dict[str, dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """The methods at ``point`` that meet the hard constraints and have a measured quality, and
    why each other one does not."""
    usable: list[str] = []
    rejected: list[str] = []
    for name, quality in point.quality.items():
        why = _excluded_by(c, name, rows.get(name, {}))
        if why is None and _mean(quality) is None:
            why = f"{name} (no quality measured at {point.size:,} examples)"
        if why is None:
            usable.append(name)
        else:
            rejected.append(why)
    return usable, rejected


def _curve_reasons(metric: str, point: SizePoint, chosen: str, tied: list[str]) -> list[str]:
    """The measured figures behind a curve recommendation: the chosen method's quality, the best
    one's when a constraint excluded it, and the ties, with what a tie means in compare."""
    at = f"at {point.size:,} examples"
    q = point.quality
    if chosen == point.best:
        reasons = [f"measured {metric} {at}: {chosen} {_quality_text(q[chosen])}, the best at this size"]
    else:
        standing = f"tied with it ({TIE_MEANING})" if chosen in point.tied else "significantly below it"
        reasons = [
            f"the best {at}, {point.best} ({metric} {_quality_text(q[point.best])}), does not meet the "
            f"constraints; {chosen} ({_quality_text(q[chosen])}) is the best that does, {standing}"
        ]
    if tied:
        figures = ", ".join(f"{m} {_quality_text(q[m])}" for m in tied)
        reasons.append(f"tied with {point.best} {at} ({TIE_MEANING}): {figures}")
    return reasons


def nearest_size(sizes: Sequence[int], n: int) -> tuple[int, str | None]:
    """The measured size nearest to ``n`` on a log scale (by ratio: 300 is nearer 256 than 1,024),
    with a note when ``n`` is not itself measured. Sizes must be increasing. Exactly midway (on a
    log scale) the smaller size wins: a point measured with more data than N would credit
    examples you do not have."""
    if n < sizes[0]:
        return sizes[0], f"N={n} is below the smallest measured size {sizes[0]:,}: using {sizes[0]:,}"
    if n > sizes[-1]:
        return sizes[-1], f"N={n} is beyond the largest measured size {sizes[-1]:,}: using {sizes[-1]:,}"
    i = bisect_left(sizes, n)
    if sizes[i] == n:
        return n, None
    low, high = sizes[i - 1], sizes[i]
    size = low if n * n <= low * high else high  # n/low <= high/n, in exact integers
    return size, (
        f"N={n} lies between the measured sizes {low:,} and {high:,}: {size:,} is nearer on a log scale "
        f"({n / low:.2f}x above {low:,}, {high / n:.2f}x below {high:,})"
    )


def row_settings(row: dict[str, Any]) -> dict[str, Any] | None:
    value = row.get("config")
    return value if isinstance(value, dict) else None


def _settings(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """The settings compare measured ``name`` with, else its preset's (else none known)."""
    return dict(row_settings(row) or (PRESETS[name].settings() if name in PRESETS else {}))


def _rows_by_method(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = results.get("methods")
    if not isinstance(rows, list):
        return {}
    return {str(r.get("method")): r for r in rows if isinstance(r, dict)}


def _quality(row: dict[str, Any]) -> float | None:
    q = row.get("quality")
    if isinstance(q, dict):
        q = q.get("mean")
    return float(q) if isinstance(q, (int, float)) else None


def _mean(quality: dict[str, Any]) -> float | None:
    value = quality.get("mean")
    return float(value) if isinstance(value, (int, float)) else None


def _quality_text(quality: dict[str, Any]) -> str:
    """``0.780 [0.740, 0.820]``: the mean and, when compare measured it, the 95% interval."""
    mean = _mean(quality)
    text = "n/a" if mean is None else f"{mean:.3f}"
    low, high = quality.get("ci_low"), quality.get("ci_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _spread(row: dict[str, Any]) -> float:
    q = row.get("quality")
    if isinstance(q, dict) and isinstance(q.get("std"), (int, float)):
        return float(q["std"])
    return 0.0


def _sizes_text(sizes: Sequence[int]) -> str:
    return ", ".join(f"{s:,}" for s in sizes)


def read_curves(results: dict[str, Any]) -> Curves | None:
    """compare's data-size curves in ``results``, or None when it ran without ``--sizes``. The
    whole structure is checked here, so a malformed file fails naming what is wrong instead of
    yielding a recommendation from half a curve."""
    raw = results.get("curves")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _malformed("'curves' is not an object")
    sizes = _curve_sizes(_key(raw, "sizes", "curves"))
    methods = _key(raw, "methods", "curves")
    if not isinstance(methods, dict) or not methods:
        raise _malformed("curves.methods is not a non-empty object of method name -> points")
    quality = {str(name): _method_points(str(name), points, sizes) for name, points in methods.items()}
    verdicts = _key(raw, "per_size", "curves")
    if not isinstance(verdicts, list) or len(verdicts) != len(sizes):
        count = len(verdicts) if isinstance(verdicts, list) else "no list"
        raise _malformed(f"curves.per_size must hold one entry per size ({len(sizes)}), got {count}")
    points = tuple(
        _size_point(i, entry, size, quality)
        for i, (entry, size) in enumerate(zip(verdicts, sizes, strict=True))
    )
    metric = raw.get("metric")
    changes = raw.get("order_changes", [])
    if not isinstance(changes, list) or not all(isinstance(s, str) for s in changes):
        raise _malformed("curves.order_changes is not a list of strings")
    return Curves(metric if isinstance(metric, str) else "quality", points, tuple(changes))


def _malformed(what: str) -> ValueError:
    return ValueError(f"malformed curves in the results: {what}")


def _key(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _malformed(f"{where} has no {key!r}")
    return obj[key]


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _curve_sizes(sizes: Any) -> list[int]:
    """``curves.sizes``: positive whole numbers of training examples, strictly increasing."""
    if not isinstance(sizes, list) or not sizes or not all(_is_size(s) for s in sizes):
        raise _malformed(f"curves.sizes must be a non-empty list of positive integers, got {sizes!r}")
    for before, after in pairwise(sizes):
        if after <= before:
            raise _malformed(f"curves.sizes must be increasing, got {sizes} ({after} after {before})")
    return sizes


def _method_points(name: str, points: Any, sizes: list[int]) -> dict[int, dict[str, Any]]:
    """One method's curve as size -> quality summary, with exactly one point per measured size."""
    where = f"curves.methods.{name}"
    if not isinstance(points, list):
        raise _malformed(f"{where} is not a list of points")
    by_size: dict[int, dict[str, Any]] = {}
    for j, point in enumerate(points):
        if not isinstance(point, dict):
            raise _malformed(f"{where}[{j}] is not an object")
        size = _key(point, "size", f"{where}[{j}]")
        quality = _key(point, "quality", f"{where}[{j}]")
        if not isinstance(quality, dict):
            raise _malformed(f"{where}[{j}].quality is not an object")
        _key(quality, "mean", f"{where}[{j}].quality")
        if size not in sizes or size in by_size:
            problem = "a second point" if size in by_size else "a point"
            raise _malformed(f"{where} has {problem} at size {size!r}, which curves.sizes does not list once")
        by_size[size] = quality
    missing = [s for s in sizes if s not in by_size]
    if missing:
        raise _malformed(f"{where} has no point at size {_sizes_text(missing)}")
    return by_size


def _size_point(i: int, entry: Any, size: int, quality: dict[str, dict[int, dict[str, Any]]]) -> SizePoint:
    """``curves.per_size[i]``: the best method at ``size`` and those tied with it (itself included)."""
    where = f"curves.per_size[{i}]"
    if not isinstance(entry, dict):
        raise _malformed(f"{where} is not an object")
    if _key(entry, "size", where) != size:
        raise _malformed(
            f"{where} is for size {entry['size']!r}, expected {size} (the order of curves.sizes)"
        )
    best, tied = _key(entry, "best", where), _key(entry, "tied", where)
    if best not in quality:
        raise _malformed(f"{where}.best {best!r} is not one of curves.methods")
    if not isinstance(tied, list) or any(m not in quality for m in tied):
        raise _malformed(f"{where}.tied must list methods of curves.methods, got {tied!r}")
    if best not in tied:
        raise _malformed(f"{where}.tied does not include the best method {best!r}")
    return SizePoint(size, {m: points[size] for m, points in quality.items()}, best, tuple(tied))


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


def model_type_of(given: str | None, model: str | None, results: dict[str, Any] | None) -> str:
    """The kind of base model: ``--model-type``, ``--model``'s (from its config) and the
    results' must agree; none of them: causal."""
    sources = {
        "--model-type": given,
        "--model": model_kind(model) if model else None,
        "--results": (results or {}).get("model_kind"),
    }
    known = {k: v for k, v in sources.items() if v}
    if len(set(known.values())) > 1:
        said = ", ".join(f"{k} says {v}" for k, v in known.items())
        raise ValueError(f"the model kinds disagree ({said}); give the options for one model")
    return next(iter(known.values()), "causal")
