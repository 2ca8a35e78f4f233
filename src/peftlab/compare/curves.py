"""Data-size curves (``--sizes 64,256,1024``): every method's quality at each training-set size,
which methods are best at each size, and where their order changes.

Every size is a comparison of its own on the first N training rows (each smaller set inside the
larger), with its own learning-rate search and one budget rule for all methods
(:meth:`peftlab.compare.options.RunSizes.for_train_size`), scored on the same test split. This
module turns the scored sizes into ``results["curves"]`` and the report's lines; the scoring is
:mod:`peftlab.compare.results`'.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

# at each size, for each pair of methods (a, b) in the run's order: "a" (a ahead), "b" or "tied"
Relations = Mapping[int, Mapping[tuple[str, str], str]]


def build_curves(
    sizes: Sequence[int],
    rows_by_size: Mapping[int, Sequence[dict[str, Any]]],
    relations: Relations,
    metric: str,
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """``results["curves"]`` from each size's scored rows (``method``, ``quality``,
    ``tied_with_best``, ``examples_seen``) and the pairwise relations."""
    methods = [r["method"] for r in rows_by_size[sizes[0]]]
    curves: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    per_size = []
    for size in sizes:
        rows = {r["method"]: r for r in rows_by_size[size]}
        for method in methods:
            row = rows[method]
            curves[method].append(
                {
                    "size": size,
                    "quality": row["quality"],
                    "tied_with_best": row["tied_with_best"],
                    "examples_seen": row["examples_seen"],
                    "learning_rate": row["learning_rate"],
                    "lr_at_edge": row.get("lr_at_edge"),
                    "stopped_at": row.get("best_examples"),
                }
            )
        best = max(methods, key=lambda m: rows[m]["quality"]["mean"])
        best = next((m for m in methods if rows[m].get("is_best")), best)
        per_size.append(
            {"size": size, "best": best, "tied": [m for m in methods if rows[m]["tied_with_best"]]}
        )
    return {
        "sizes": list(sizes),
        "metric": metric,
        "methods": curves,
        "per_size": per_size,
        "order_changes": order_changes(sizes, relations, labels),
        "rises": {m: rise(curves[m]) for m in methods},
    }


def rise(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether quality rose from the smallest size to the largest, and if not, what the run
    knows of why: the intervals, the learning rates the searches chose, where training stopped."""
    first, last = points[0], points[-1]
    gained = last["quality"]["mean"] - first["quality"]["mean"]
    if gained > 0:
        return {"rises": True, "gain": gained, "why_not": None}
    why = [
        f"{last['quality']['mean']:.3f} at {last['size']:,} examples against {first['quality']['mean']:.3f} "
        f"at {first['size']:,}"
    ]
    if last["quality"].get("ci_low", -1) <= first["quality"].get("ci_high", 1):
        why.append("the intervals overlap, so within what this test split can tell apart")
    if last.get("learning_rate") != first.get("learning_rate"):
        why.append(
            f"the searches chose learning rate {last.get('learning_rate'):g} at {last['size']:,} and "
            f"{first.get('learning_rate'):g} at {first['size']:,} by validation loss, which need not "
            "follow the test metric"
        )
    if last.get("lr_at_edge"):
        why.append(f"the rate at {last['size']:,} was at the edge of the search")
    if last.get("stopped_at") is not None:
        why.append(f"at {last['size']:,} its best validation came at {last['stopped_at']:,} examples")
    return {"rises": False, "gain": gained, "why_not": "; ".join(why)}


def order_changes(sizes: Sequence[int], relations: Relations, labels: Mapping[str, str]) -> list[str]:
    """For every pair of methods whose relation is not the same at every size, one sentence:
    "IA3 ahead of LoRA up to 256 examples; tied at 1,024"."""
    pairs = list(relations[sizes[0]])
    out = []
    for a, b in pairs:
        sequence = [relations[size][(a, b)] for size in sizes]
        if len(set(sequence)) > 1:
            out.append(_sentence(sizes, sequence, labels[a], labels[b]))
    return out


def _sentence(sizes: Sequence[int], sequence: Sequence[str], a: str, b: str) -> str:
    parts = []
    runs = [
        (rel, [s for s, _ in group])
        for rel, group in itertools.groupby(zip(sizes, sequence, strict=True), key=lambda x: x[1])
    ]
    for index, (relation, at) in enumerate(runs):
        tied = f"{a} and {b} tied" if index == 0 else "tied"
        what = {"a": f"{a} ahead of {b}", "b": f"{b} ahead of {a}", "tied": tied}[relation]
        if len(at) == 1:
            where = f"at {at[0]:,}"
        elif index == 0:
            where = f"up to {at[-1]:,}"
        elif index == len(runs) - 1:
            where = f"from {at[0]:,}"
        else:
            where = f"from {at[0]:,} to {at[-1]:,}"
        parts.append(f"{what} {where}" + (" examples" if index == 0 else ""))
    return "; ".join(parts)


def all_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(methods, 2))


def curve_lines(results: dict[str, Any]) -> list[str]:
    """The report's section: quality per method and size, the best (and those tied with it) per
    size, where the order changes, and any method whose quality did not rise."""
    curves = results["curves"]
    labels = {r["method"]: r["label"] for r in results["methods"]}
    sizes = curves["sizes"]
    header = ["Method", *(f"{n:,} examples" for n in sizes)]
    rows = []
    for method, points in curves["methods"].items():
        cells = []
        for p in points:
            q = p["quality"]
            mark = " *" if p["tied_with_best"] else ""
            cells.append(
                f"{q['mean']:.3f} [{q.get('ci_low', q['mean']):.3f}, {q.get('ci_high', q['mean']):.3f}]{mark}"
            )
        rows.append([labels.get(method, method), *cells])
    best_rows = [
        [
            f"{p['size']:,}",
            labels.get(p["best"], p["best"]),
            ", ".join(labels.get(m, m) for m in p["tied"] if m != p["best"]) or "-",
        ]
        for p in curves["per_size"]
    ]
    lines = [
        f"{curves['metric']} with its 95% interval at each training-set size; * = best or statistically "
        "tied with the best at that size. Each size is a comparison of its own on the first N training "
        "rows (each smaller set inside the larger), with its own learning-rate search and one budget "
        "rule for every method (up to 4 epochs, early stopping on the validation split).",
        "",
        _table(header, rows),
        "",
        _table(["Training examples", "Best", "Tied with it"], best_rows),
        "",
    ]
    changes = curves["order_changes"]
    lines.append(
        "Where the order changes: "
        + (" · ".join(changes) if changes else "nowhere: the same order at every size.")
    )
    for method, rise_ in curves["rises"].items():
        if not rise_["rises"]:
            lines += [
                "",
                f"- {labels.get(method, method)} did not rise from the smallest size to the largest: "
                f"{rise_['why_not']}.",
            ]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
