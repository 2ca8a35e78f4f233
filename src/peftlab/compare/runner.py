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
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.compare.forgetting import base_scores, tuned_scores
from peftlab.compare.inputs import ComparisonInputs, load_inputs
from peftlab.compare.measure import (
    current_rss,
    measure_method,
    peak_rss,
    release_free_memory,
    reset_peak_rss,
    spread,
)
from peftlab.compare.memory_plan import ComparisonPlans, does_not_fit_record, remember
from peftlab.compare.options import SEARCH_GRIDS, CompareOptions, Unit, comparison_units, resolve_options
from peftlab.compare.results import LOSS_METRICS, RETAIN_BASE, ZERO_SHOT, build_results, write_outputs
from peftlab.compare.search import TrialStart, edge_of, search_learning_rate
from peftlab.compare.session import EarlyStopping, Session, TestOutput, TrainOutcome
from peftlab.compare.store import Store, default_storage
from peftlab.devices import parse_device
from peftlab.models import quiet
from peftlab.presets import PRESETS, MethodPreset
from peftlab.training.memory import GIB, cap_device_memory, free_device_memory, is_out_of_memory

POLL_S = 5.0


def run_compare(opts: CompareOptions, *, verbose: bool = False) -> dict[str, Any]:
    """Run (or finish) every method and write results.json, report.md and plots to ``opts.out``."""
    opts = resolve_options(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if not opts.storage:
        opts = replace(opts, storage=default_storage(out))
    assert opts.storage is not None
    store = Store(opts.storage)
    with quiet(verbose):
        inputs = load_inputs(worker_options(opts, 0), verbose=verbose)
    session = Session(inputs, verbose=verbose)
    plans = _memory_plans(opts, session)
    # the sizes as resolved (not as given): a default that changed between versions changes the
    # figures too, and --steps N is --budget N x batch size
    settings = {**opts.settings(), **inputs.sizes.settings(), "data_sha256": inputs.data.fingerprint()}
    settings.pop("steps", None)
    store.check_settings(settings)
    _zero_shot(session, store)
    _check_metric(inputs, store)
    progress = Progress(store, opts)
    workers = _start_workers(opts, verbose)
    try:
        work(opts, session, store, on_unit=progress.refresh, verbose=verbose, plans=plans)
        while not all(store.is_done(unit.name) for unit in comparison_units(opts)):
            _check_workers(workers)
            progress.refresh()
            time.sleep(POLL_S)
    finally:
        for proc in workers:
            proc.join(timeout=1)
            if proc.is_alive():
                proc.terminate()
        progress.close()
    results = build_results(opts, inputs, store)
    write_outputs(results, out)
    return results


# ---- the work ------------------------------------------------------------------------------
def work(
    opts: CompareOptions,
    session: Session,
    store: Store,
    *,
    on_unit: Callable[[], None] = lambda: None,
    verbose: bool = False,
    continue_trials: bool = True,
    plans: ComparisonPlans | None = None,
) -> None:
    """Take every unit (a method at a size) no live worker has and that is not done: search,
    final runs, record, each within the method's memory plan. The final run of seed 0 goes on
    from the chosen search trial when this process ran it (``continue_trials``; the figures are
    the same as retraining it, only sooner)."""
    plans = ComparisonPlans(session.bases, opts.max_memory) if plans is None else plans
    for unit in comparison_units(opts):
        if not store.claim(unit.name):
            continue
        with quiet(verbose):
            _work_within_memory(
                opts, session.at_size(unit.size), store, unit, plans, on_unit, continue_trials
            )
        store.finish(unit.name)
        on_unit()


def _memory_plans(opts: CompareOptions, session: Session) -> ComparisonPlans:
    """The comparison's planners; ``--max-memory`` checked against the least demanding method
    (and made a hard limit on CUDA)."""
    plans = ComparisonPlans(session.bases, opts.max_memory)
    plans.check_max_memory(opts.methods)
    if opts.max_memory is not None:
        cap_device_memory(session.inputs.precision.device, int(opts.max_memory * GIB))
    return plans


def _work_within_memory(
    opts: CompareOptions,
    session: Session,
    store: Store,
    unit: Unit,
    plans: ComparisonPlans,
    on_unit: Callable[[], None],
    continue_trials: bool,
) -> None:
    """One unit under its method's memory plan (:mod:`peftlab.compare.memory_plan`): an
    out-of-memory error frees what the method held, halves the micro-batch (checkpointing at
    one example) and starts the trial or run that failed again (what finished is kept); a method
    that does not fit even so gets a record saying what it needs, and the comparison goes on."""
    preset = PRESETS[unit.method]
    plan, planner = plans.plan(store, preset)
    while plan.fits:
        session.plan = plan
        try:
            _work_on(opts, session, store, unit, on_unit, continue_trials)
            return
        except Exception as err:
            if not is_out_of_memory(err):
                raise
        free_device_memory(session.inputs.precision.device)
        plan = planner.after_out_of_memory(plan)
        remember(store, preset, plan)
        then = f"again with micro-batch x accumulation {plan.describe()}" if plan.fits else plan.refusal()
        tqdm.write(f"compare: {preset.name} ran out of memory; {then}")
    finished = time.time()
    for seed in range(opts.seeds):
        if store.get_record(unit.name, seed) is None:
            store.put_record(unit.name, seed, does_not_fit_record(plan, seed, finished))


def _work_on(
    opts: CompareOptions,
    session: Session,
    store: Store,
    unit: Unit,
    on_unit: Callable[[], None],
    continue_trials: bool,
) -> None:
    preset = PRESETS[unit.method]
    kept: list[TrialStart] = []
    lr, trials, edge = _learning_rate(opts, session, store, unit, on_unit, kept if continue_trials else None)
    start = kept[0] if kept and kept[0].learning_rate == lr else None
    kept.clear()
    search = {"effort": _effort(opts, preset), "trials": trials, "chosen": lr, "at_edge": edge}
    try:
        for seed in range(opts.seeds):
            if store.get_record(unit.name, seed) is None:
                record = _final_run(opts, session, store, unit, lr, seed, start if seed == 0 else None)
                store.put_record(unit.name, seed, {**record, "search": search})
            start = None
            store.heartbeat(unit.name)
            on_unit()
    finally:
        session.release()  # the next unit starts from the base as loaded


def _effort(opts: CompareOptions, preset: MethodPreset) -> str:
    return "fixed by --lr" if preset.name in opts.learning_rates else str(opts.search)


def _learning_rate(
    opts: CompareOptions,
    session: Session,
    store: Store,
    unit: Unit,
    on_unit: Callable[[], None],
    kept: list[TrialStart] | None,
) -> tuple[float, list[dict[str, Any]], str | None]:
    """(learning rate, the search's trials, whether the rate is still at the edge of the rates
    tried: "smallest" / "largest" / None)."""
    preset = PRESETS[unit.method]
    fixed = opts.learning_rates.get(preset.name)
    if fixed is not None:
        return fixed, [], None
    if opts.search == "none":
        return preset.lr_for(session.model_kind), [], None

    def trial_done() -> None:
        store.heartbeat(unit.name)
        on_unit()

    def keep_best(start: TrialStart) -> None:  # only the best so far: each holds a model
        if kept is not None and (not kept or start.key() < kept[0].key()):
            kept[:] = [start]

    lr, trials = search_learning_rate(
        session, store, preset, str(opts.search), name=unit.name, on_trial=trial_done, on_start=keep_best
    )
    return lr, [t.to_dict() for t in trials], edge_of(lr, trials)


def _final_run(
    opts: CompareOptions,
    session: Session,
    store: Store,
    unit: Unit,
    lr: float,
    seed: int,
    start: TrialStart | None,
) -> dict[str, Any]:
    """Train with early stopping on the validation loss (keeping the best state), going on from
    the search trial ``start`` when there is one; score on the test split and, for seed 0,
    measure the costs and what tuning cost the base (forgetting)."""
    preset = PRESETS[unit.method]

    def heartbeat() -> None:
        store.heartbeat(unit.name)

    desc = f"{preset.name} (seed {seed})"
    if start is not None:
        model, peft, stopper, outcome = start.model, start.peft, start.stopper, start.outcome
        session.activate(peft)
        stopper.heartbeat = heartbeat
    else:
        model, peft = session.prepare(preset, seed)
        stopper = EarlyStopping(model, session.sizes.patience, heartbeat=heartbeat)
    release_free_memory()
    rss_before = current_rss()
    reset_ok = reset_peak_rss()
    if start is None:
        outcome = session.train(
            model, lr, seed, budget=session.sizes.budget, on_validation=stopper, desc=desc
        )
    elif outcome.reason == "paused":
        outcome = session.resume(outcome, model, on_validation=stopper, desc=desc)
    peak = peak_rss() if reset_ok else None
    stopper.restore()
    record = _run_record(session.evaluate_test(model), outcome, stopper, lr, seed)
    record.update(peak_rss_bytes=peak, rss_before_bytes=rss_before, continued_search_trial=start is not None)
    record["memory_plan"] = session.plan.to_dict() if session.plan is not None else None
    if seed == 0:
        adapters = Path(opts.out) / "adapters" / unit.name
        record["measured"] = measure_method(
            session.inputs,
            model,
            peft,
            preset,
            repeats=int(opts.latency_repeats or 1),
            adapter_dir=adapters,
            plan=session.plan,
        )
        record["retain"] = _retain_scores(session.inputs, store, model)
    del model, peft
    gc.collect()
    return record


def _run_record(
    test: TestOutput, outcome: TrainOutcome, stopper: EarlyStopping, lr: float, seed: int
) -> dict[str, Any]:
    """What the store keeps of one final run: its test outputs, losses, validations, where and
    why it stopped, and its timings."""
    history = outcome.history
    return {
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
        "step_spread": spread(history.step_times),
        "machine": outcome.machine,
        "peak_gpu_memory_bytes": outcome.peak_gpu_bytes,
        "train_wall_s": outcome.wall_s,
        "finished_at": time.time(),
    }


def _zero_shot(session: Session, store: Store) -> None:
    """The untouched base's test outputs and, where forgetting is measured, its retain scores."""
    inputs = session.inputs
    if store.get_record(ZERO_SHOT, 0) is None:
        test = session.evaluate_test(inputs.base)
        store.put_record(ZERO_SHOT, 0, {"test": test.to_dict(), "metrics": test.metrics})
    if inputs.retain is not None and store.get_record(RETAIN_BASE, 0) is None:
        scores = base_scores(inputs.base, inputs.retain, inputs.pad, inputs.precision)
        store.put_record(RETAIN_BASE, 0, {"scores": scores, "kind": inputs.retain.kind})


def _retain_scores(inputs: ComparisonInputs, store: Store, model: nn.Module) -> list[Any] | None:
    """The tuned model's per-passage retain scores against the base's (None: not measured)."""
    base = store.get_record(RETAIN_BASE, 0)
    if inputs.retain is None or base is None:
        return None
    return tuned_scores(model, inputs.retain, base["scores"], inputs.pad, inputs.precision)


def _check_metric(inputs: ComparisonInputs, store: Store) -> None:
    zero = store.get_record(ZERO_SHOT, 0)
    assert zero is not None
    choices = [k for k in zero["metrics"] if k not in LOSS_METRICS]
    if inputs.metric not in choices:
        raise ValueError(f"--metric {inputs.metric!r}: this run measures {', '.join(choices)}")


# ---- workers -------------------------------------------------------------------------------
def _start_workers(opts: CompareOptions, verbose: bool) -> list[Any]:
    """``opts.workers - 1`` more processes running :func:`work` on the same store."""
    if opts.workers <= 1:
        return []
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=run_worker, args=(opts, i, verbose), daemon=True)
        for i in range(1, opts.workers)
    ]
    for proc in workers:
        proc.start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    return workers


def worker_options(opts: CompareOptions, index: int) -> CompareOptions:
    """The options worker ``index`` runs with: with several local workers on a machine with
    several GPUs and ``--device auto`` or ``cuda``, each worker takes its own, ``cuda:(index mod
    GPUs)`` (the figures do not depend on which GPU ran them, only the timings)."""
    several = opts.workers > 1 and torch.cuda.is_available() and torch.cuda.device_count() > 1
    if several and parse_device(opts.device) in ("auto", "cuda"):
        return replace(opts, device=f"cuda:{index % torch.cuda.device_count()}")
    return opts


def run_worker(opts: CompareOptions, index: int, verbose: bool) -> None:
    """A worker process (``--workers``): its own base and data, the same store, the methods no
    other worker has taken."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    assert opts.storage is not None
    store = Store(opts.storage)
    with quiet(verbose):
        inputs = load_inputs(worker_options(opts, index), verbose=verbose)
    session = Session(inputs, verbose=verbose)
    work(opts, session, store, verbose=verbose, plans=_memory_plans(opts, session))


def _check_workers(workers: list[Any]) -> None:
    failed = [p for p in workers if not p.is_alive() and p.exitcode not in (0, None)]
    if failed:
        raise RuntimeError(
            f"{len(failed)} compare worker(s) failed (exit code {failed[0].exitcode}); what they finished is "
            "kept: rerun the same command to continue"
        )


class Progress:
    """One bar over the whole comparison: search trials and final runs done of the most there
    can be (pruned trials count as done), with elapsed time and an estimate of what remains."""

    def __init__(self, store: Store, opts: CompareOptions) -> None:
        self.store, self.opts = store, opts
        self.units = comparison_units(opts)
        per_search = len(SEARCH_GRIDS[str(opts.search)]) if opts.search != "none" else 0
        searches = sum(per_search for u in self.units if u.method not in opts.learning_rates)
        self.bar = tqdm(
            total=searches + len(self.units) * opts.seeds, desc="compare", unit="run", dynamic_ncols=True
        )
        self.refresh()

    def refresh(self) -> None:
        done = 0
        for unit in self.units:
            done += sum(1 for s in range(self.opts.seeds) if self.store.get_record(unit.name, s) is not None)
            if unit.method not in self.opts.learning_rates and self.opts.search != "none":
                study = self.store.study(f"search:{unit.name}")
                done += sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        done = min(done, self.bar.total)
        # on a terminal the clock ticks; in a log file every refresh is a line, so only changes
        if done != self.bar.n or sys.stderr.isatty():
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
