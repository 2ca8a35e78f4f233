"""The learning-rate search of one method: an Optuna study over a log grid around the preset's
learning rate, each trial trained on the training split and judged by its validation loss,
with Optuna's successive-halving pruner stopping trials that fall behind early.

A trial is the start of the final run it would become: the same schedule over the whole budget
(not a short one that would favour larger rates), paused after the search budget. The final run
at the chosen rate goes on from that trial where it is still in memory
(:class:`TrialStart`), and otherwise retrains it, with the same result.

A grid only brackets the best rate if the winner lies inside it. When the chosen rate is the
smallest or largest tried, the search tries one grid step beyond it (x3 above the largest, /3
below the smallest) and chooses again, at most :data:`MAX_EXTENSIONS` times per method; a rate
beyond the edge that diverges or is pruned still counts as tried, which settles that edge.
:func:`edge_of` says whether the rate finally chosen is still at an edge, so a report can warn
that the optimum may lie further out.

Trials run one after the other in a fixed order (the preset's learning rate first, then the
grid, then any extension), so the pruner's decisions, and the learning rate chosen, are the same
however the methods are spread over workers. The study lives in the comparison's storage: a rerun
after a kill reuses every finished trial and retrains the one that was running under the same
trial (Optuna keeps its reports), and each extension is decided from the finished trials alone,
so the decisions are those of an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peftlab.compare.options import SEARCH_GRIDS
from peftlab.compare.session import EarlyStopping, Session, TrainOutcome, Validation
from peftlab.compare.store import Store, optuna_module
from peftlab.presets import MethodPreset
from peftlab.training.loop import TrainingDiverged

PARAM = "learning_rate"
EXTENSION = "extension"  # the user attribute marking a trial enqueued beyond the grid's edge
# the user attribute recording the step at which the pruner stopped a trial, written as soon as it
# decides: a worker killed before it tells the study leaves a trial that looks as if it went on
PRUNED_AT = "pruned_at"
REDUCTION_FACTOR = 3  # successive halving keeps the best third at each rung
GRID_STEP = 3  # every factor in SEARCH_GRIDS is a power of it: one step further is x3 or /3
MAX_EXTENSIONS = 2  # each costs a trial; two steps reach x27 / /27 of the preset from a quick grid


@dataclass(frozen=True)
class Trial:
    learning_rate: float
    state: str  # "complete" / "pruned" / "diverged"
    val_loss: float | None  # the best validation loss the trial reached
    val_metric: float | None
    examples: int  # training examples it saw before it ended
    extension: bool = False  # tried beyond the grid because the chosen rate was at its edge

    def to_dict(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "state": self.state,
            "val_loss": self.val_loss,
            "val_metric": self.val_metric,
            "examples": self.examples,
            "extension": self.extension,
        }


@dataclass
class TrialStart:
    """A finished trial's paused run, which the final run at its learning rate continues."""

    learning_rate: float
    val_loss: float
    model: Any
    peft: Any
    outcome: TrainOutcome
    stopper: EarlyStopping

    def key(self) -> tuple[float, float]:
        return choice_key(self.val_loss, self.learning_rate)


def choice_key(val_loss: float | None, learning_rate: float) -> tuple[float, float]:
    """How the search chooses: the lowest validation loss (none: last), the smaller rate on a tie."""
    return (math.inf if val_loss is None else val_loss, learning_rate)


def grid(preset_lr: float, effort: str) -> list[float]:
    """The rates ``effort`` tries, in order: the preset's times each factor of its grid."""
    return [_rounded(preset_lr * factor) for factor in SEARCH_GRIDS[effort]]


def _rounded(rate: float) -> float:
    """A rate at 3 significant digits, as stored, shown and compared across reruns."""
    return float(f"{rate:.3g}")


def edge_of(chosen: float, trials: Sequence[Trial]) -> str | None:
    """``"smallest"`` or ``"largest"`` when ``chosen`` (one of the trials' rates) is at that edge
    of every rate tried, diverged and pruned ones included: the best rate may then lie beyond it.
    None inside the range, and when one rate alone was tried (no search, no edge to speak of)."""
    rates = {t.learning_rate for t in trials}
    if len(rates) < 2:
        return None
    if chosen <= min(rates):
        return "smallest"
    if chosen >= max(rates):
        return "largest"
    return None


def _extension(preset_lr: float, chosen: float, trials: Sequence[Trial]) -> float | None:
    """The rate one grid step beyond ``chosen`` when it is at an edge and extensions remain."""
    side = edge_of(chosen, trials)
    if side is None or sum(t.extension for t in trials) >= MAX_EXTENSIONS:
        return None
    # counted from the preset's rate, not the rounded edge, so rounding never accumulates and a
    # quick grid's extension lands on the full grid's rate (x9 of 2e-3 is 1.8e-2 either way)
    steps = round(math.log(chosen / preset_lr, GRID_STEP)) + (1 if side == "largest" else -1)
    return _rounded(preset_lr * float(GRID_STEP) ** steps)


def search_learning_rate(
    session: Session,
    store: Store,
    preset: MethodPreset,
    effort: str,
    *,
    name: str | None = None,
    on_trial: Callable[[], None] = lambda: None,
    on_start: Callable[[TrialStart], None] | None = None,
) -> tuple[float, list[Trial]]:
    """Run (or finish) the method's search; returns the chosen learning rate and every trial,
    in the order tried (the grid's, then any extension beyond its edge). ``name``: the study's
    key in the store (a method at one training-set size has its own; default the preset's name).
    ``on_start`` gets each trial that ran to the end of the search budget here (a final run can
    continue the chosen one)."""
    optuna = optuna_module()
    study = store.study(f"search:{name or preset.name}", pruner=_pruner(session))
    preset_lr = preset.lr_for(session.model_kind)
    rates = grid(preset_lr, effort)
    # every grid point once, in order (a kill may have come between two of these)
    for lr in rates:
        study.enqueue_trial({PARAM: lr}, skip_if_exists=True)
    # wide enough for the furthest extension: an enqueued rate must lie inside it
    reach = float(GRID_STEP**MAX_EXTENSIONS)
    distribution = optuna.distributions.FloatDistribution(
        min(rates) / reach / 2, max(rates) * reach * 2, log=True
    )
    while True:
        _run_pending(session, study, preset, distribution, on_trial, on_start)
        waiting = optuna.trial.TrialState.WAITING
        trials = [_summary(t) for t in study.get_trials(deepcopy=False) if t.state != waiting]
        chosen = _chosen(trials, preset, rates)
        beyond = _extension(preset_lr, chosen, trials)
        if beyond is None:
            return chosen, trials
        # decided from finished trials alone, so a rerun enqueues the same rate (or finds it)
        study.enqueue_trial({PARAM: beyond}, user_attrs={EXTENSION: True}, skip_if_exists=True)


def _pruner(session: Session) -> Any:
    optuna = optuna_module()
    # the first rung at half the search budget: earlier, a larger learning rate's faster start
    # would decide, not where it is heading
    validations = max(1, session.sizes.search_budget // session.sizes.eval_every)
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=max(1, math.ceil(validations / 2)),
        reduction_factor=REDUCTION_FACTOR,
        min_early_stopping_rate=0,
    )


def _run_pending(
    session: Session,
    study: Any,
    preset: MethodPreset,
    distribution: Any,
    on_trial: Callable[[], None],
    on_start: Callable[[TrialStart], None] | None,
) -> None:
    """Train every trial not finished yet: first one left running by a killed worker (trained
    again under the same trial), then the enqueued ones in the order they were enqueued."""
    optuna = optuna_module()
    states = optuna.trial.TrialState
    for frozen in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        trial = optuna.trial.Trial(study, frozen._trial_id)
        if PARAM not in frozen.params:  # killed between taking the trial and drawing its rate
            trial.suggest_float(PARAM, distribution.low, distribution.high, log=True)
        _run_trial(
            session, study, trial, preset, frozen.last_step, on_start, frozen.user_attrs.get(PRUNED_AT)
        )
        on_trial()
    while study.get_trials(deepcopy=False, states=(states.WAITING,)):
        trial = study.ask({PARAM: distribution})
        _run_trial(session, study, trial, preset, None, on_start)
        on_trial()


def _chosen(trials: Sequence[Trial], preset: MethodPreset, rates: Sequence[float]) -> float:
    """The rate of the finished trial with the best :func:`choice_key`."""
    finished = [t for t in trials if t.state == "complete" and t.val_loss is not None]
    if not finished:
        raise RuntimeError(
            f"{preset.name}: no learning rate of {list(rates)} trained to the end of the search (all "
            "diverged or were pruned); fix one with --lr " + f"{preset.name}=LR"
        )
    return min(finished, key=lambda t: choice_key(t.val_loss, t.learning_rate)).learning_rate


def _run_trial(
    session: Session,
    study: Any,
    trial: Any,
    preset: MethodPreset,
    reported: int | None,
    on_start: Callable[[TrialStart], None] | None,
    pruned_at: int | None = None,
) -> None:
    """Train one learning rate for the search budget (on the final run's schedule), reporting
    each validation loss to the pruner; ``reported``: the last step a killed run of this trial
    already reported, ``pruned_at``: the step at which the pruner had stopped it (the kill came
    before the study was told)."""
    optuna = optuna_module()
    lr = float(trial.params[PARAM])
    sizes = session.sizes
    model, peft = session.prepare(preset, seed=0)
    stopper = EarlyStopping(model, sizes.patience)
    best: list[float] = []
    metrics: list[float | None] = []
    pruned = False

    def on_validation(seen: int, result: Validation) -> bool:
        nonlocal pruned
        step = len(best) + 1
        best.append(min([result.loss, *best[-1:]]))
        metrics.append(result.metric)
        patience_ran_out = stopper(seen, result)  # as the final run will see it
        if reported is not None and step <= reported:
            if step == pruned_at:  # decided before the kill: pruned here
                pruned = True
                return True
            return patience_ran_out  # decided before the kill: this trial went on
        trial.report(best[-1], step)
        if trial.should_prune():
            trial.set_user_attr(PRUNED_AT, step)  # before anything else: see PRUNED_AT
            pruned = True
            return True
        return patience_ran_out

    try:
        outcome = session.train(
            model, lr, seed=0, budget=sizes.budget, stop_at=sizes.search_budget,
            on_validation=on_validation, desc=f"search {preset.name} lr={lr:g}",
        )  # fmt: skip
    except TrainingDiverged:
        trial.set_user_attr("diverged", True)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    trial.set_user_attr("examples", outcome.examples_seen)
    trial.set_user_attr("val_metric", metrics[best.index(best[-1])] if metrics else None)
    if pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    study.tell(trial, best[-1])
    if on_start is not None and best:
        on_start(TrialStart(lr, best[-1], model, peft, outcome, stopper))


def _summary(trial: Any) -> Trial:
    states = optuna_module().trial.TrialState
    if trial.user_attrs.get("diverged"):
        state = "diverged"
    else:
        state = "complete" if trial.state == states.COMPLETE else "pruned"
    losses = list(trial.intermediate_values.values())
    loss = trial.value if trial.state == states.COMPLETE else (min(losses) if losses else None)
    return Trial(
        learning_rate=float(trial.params[PARAM]),
        state=state,
        val_loss=None if loss is None or not math.isfinite(loss) else float(loss),
        val_metric=trial.user_attrs.get("val_metric"),
        examples=int(trial.user_attrs.get("examples", 0)),
        extension=bool(trial.user_attrs.get(EXTENSION, False)),
    )
