"""The learning-rate search: it picks the rate that is known to win, Optuna's pruner really stops
the losing trials, a diverging rate is recorded and skipped, a winner at the grid's edge is
followed beyond it (twice at most), and a search killed mid-trial finishes as if it had never
been interrupted."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from compare_fakes import BEST_LR, FakeSession
from peftlab.compare.options import SEARCH_GRIDS
from peftlab.compare.search import GRID_STEP, MAX_EXTENSIONS, edge_of, grid, search_learning_rate
from peftlab.compare.store import Store
from peftlab.presets import PRESETS

TESTS = Path(__file__).parent
LORA = PRESETS["lora"]


def _store(tmp_path: Path, name: str = "s.db") -> Store:
    return Store(f"sqlite:///{tmp_path / name}")


def _search(session: Any, store: Store, effort: str = "quick") -> tuple[float, list[Any]]:
    return search_learning_rate(session, store, LORA, effort)  # type: ignore[arg-type]


def test_grid_is_around_the_preset_with_the_preset_first() -> None:
    assert grid(2e-3, "quick") == [2e-3, 6e-3, 6.67e-4]
    assert grid(2e-3, "full") == [2e-3, 6e-3, 6.67e-4, 1.8e-2, 2.22e-4]
    assert grid(2e-3, "none") == [2e-3]


def test_search_picks_the_rate_that_wins_and_prunes_the_rest(tmp_path: Path) -> None:
    session = FakeSession()
    lr, trials = _search(session, _store(tmp_path), "full")
    assert math.isclose(lr, BEST_LR)
    by_lr = {t.learning_rate: t for t in trials}
    assert [t.learning_rate for t in trials] == grid(2e-3, "full")  # tried in the grid's order
    assert by_lr[2e-3].state == by_lr[6e-3].state == "complete"
    # the far rates fall behind at the first rung (half the trial: five validations of ten) and
    # stop there
    for far in (6.67e-4, 1.8e-2, 2.22e-4):
        assert by_lr[far].state == "pruned" and by_lr[far].examples == 20
    trained = dict(session.trained)
    assert trained[6.67e-4] == 20 and trained[2e-3] == 40  # training really stopped early
    assert by_lr[6e-3].val_loss == pytest.approx(abs(math.log(6e-3 / BEST_LR)) + 1 / 10)


def test_a_diverging_rate_is_recorded_and_never_chosen(tmp_path: Path) -> None:
    lr, trials = _search(FakeSession(diverge_at=1e-2), _store(tmp_path), "full")
    assert math.isclose(lr, BEST_LR)
    assert {t.learning_rate: t.state for t in trials}[1.8e-2] == "diverged"


def test_every_rate_diverging_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"no learning rate .* fix one with --lr lora=LR"):
        _search(FakeSession(diverge_at=0.0), _store(tmp_path))


def _tried(trials: list[Any]) -> list[float]:
    return [t.learning_rate for t in trials]


def test_grid_factors_are_powers_of_the_extension_step() -> None:
    """An extension is one grid step beyond the edge only if every grid is a log grid of that step."""
    for factors in SEARCH_GRIDS.values():
        for factor in factors:
            assert factor == pytest.approx(GRID_STEP ** round(math.log(factor, GRID_STEP)))


def test_an_edge_that_wins_is_extended_beyond_the_grid(tmp_path: Path) -> None:
    """The optimum (2e-2) lies above the quick grid: its largest rate wins, so 1.8e-2 (x9) is
    tried and chosen; being the largest again, 5.4e-2 (x27) is tried, loses and is pruned, which
    settles the edge."""
    lr, trials = _search(FakeSession(best_lr=2e-2), _store(tmp_path))
    assert _tried(trials) == [2e-3, 6e-3, 6.67e-4, 1.8e-2, 5.4e-2]
    assert [t.extension for t in trials] == [False, False, False, True, True]
    assert lr == 1.8e-2 and trials[3].state == "complete" and trials[4].state == "pruned"
    assert edge_of(lr, trials) is None
    assert trials[3].to_dict()["extension"] is True


@pytest.mark.parametrize(
    ("best_lr", "beyond", "edge"),
    [(1.0, [1.8e-2, 5.4e-2], "largest"), (1e-6, [2.22e-4, 7.41e-5], "smallest")],
)
def test_extensions_stop_after_two_and_the_edge_is_reported(
    tmp_path: Path, best_lr: float, beyond: list[float], edge: str
) -> None:
    lr, trials = _search(FakeSession(best_lr=best_lr), _store(tmp_path))
    assert MAX_EXTENSIONS == 2
    assert _tried(trials) == [2e-3, 6e-3, 6.67e-4, *beyond]  # x3 per step, from the preset's rate
    assert lr == beyond[-1] and edge_of(lr, trials) == edge  # still improving at the last one


@pytest.mark.parametrize(("effort", "best_lr"), [("full", BEST_LR), ("quick", 2e-3)])
def test_an_optimum_inside_the_grid_is_not_extended(tmp_path: Path, effort: str, best_lr: float) -> None:
    lr, trials = _search(FakeSession(best_lr=best_lr), _store(tmp_path), effort)
    assert math.isclose(lr, best_lr) and _tried(trials) == grid(2e-3, effort)
    assert not any(t.extension for t in trials) and edge_of(lr, trials) is None


def test_a_diverging_extension_settles_the_edge(tmp_path: Path) -> None:
    lr, trials = _search(FakeSession(best_lr=1.0, diverge_at=1e-2), _store(tmp_path))
    assert _tried(trials) == [2e-3, 6e-3, 6.67e-4, 1.8e-2]  # no second step past a divergence
    assert trials[-1].state == "diverged" and trials[-1].extension
    assert lr == 6e-3 and edge_of(lr, trials) is None


def test_without_a_search_there_is_no_edge(tmp_path: Path) -> None:
    lr, trials = _search(FakeSession(best_lr=1.0), _store(tmp_path), "none")
    assert (lr, _tried(trials)) == (2e-3, [2e-3]) and edge_of(lr, trials) is None


@pytest.mark.parametrize("best_lr", [BEST_LR, 1.0])  # one extension (pruned); two (both finished)
def test_a_finished_search_is_reused(tmp_path: Path, best_lr: float) -> None:
    store = _store(tmp_path)
    first = _search(FakeSession(best_lr=best_lr), store)
    assert any(t.extension for t in first[1])
    again = FakeSession(best_lr=best_lr)
    assert _search(again, store) == first and again.trained == []


KILLED = """
import sys
sys.path.insert(0, sys.argv[1])
from compare_fakes import FakeSession
from peftlab.compare.search import search_learning_rate
from peftlab.compare.store import Store
from peftlab.presets import PRESETS
session = FakeSession(pause_lr=float(sys.argv[4]), pause_file=sys.argv[3])
search_learning_rate(session, Store(sys.argv[2]), PRESETS["lora"], "quick")
"""


@pytest.mark.parametrize(
    ("pause_lr", "retrained"),
    [
        # the finished first trial is kept; the killed one is trained again, then the rest, and
        # the extension beyond the quick grid's largest rate (6e-3 wins)
        (6e-3, [6e-3, 6.67e-4, 1.8e-2]),
        (1.8e-2, [1.8e-2]),  # killed in the extension: only it is trained again
    ],
)
def test_sigkill_mid_trial_loses_only_that_trial(
    tmp_path: Path, pause_lr: float, retrained: list[float]
) -> None:
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    paused = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(TESTS), url, str(paused), str(pause_lr)])
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the search did not reach the pause"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = FakeSession()
    after_kill = _search(resumed, Store(url))
    assert [lr for lr, _ in resumed.trained] == retrained
    uninterrupted = _search(FakeSession(), _store(tmp_path, "clean.db"))
    assert after_kill == uninterrupted


def test_a_trial_killed_before_its_rate_was_drawn_is_resumed(tmp_path: Path) -> None:
    """A kill between Optuna taking an enqueued trial (RUNNING) and drawing its learning rate
    leaves a running trial without params; the resumed search draws the enqueued rate for it."""
    store = _store(tmp_path)
    study = store.study(f"search:{LORA.name}")
    for lr in grid(2e-3, "quick"):
        study.enqueue_trial({"learning_rate": lr}, skip_if_exists=True)
    taken = study._pop_waiting_trial_id()  # what study.ask does before it samples
    assert taken is not None and study.get_trials()[0].params == {}
    lr, trials = _search(FakeSession(), store)
    uninterrupted = _search(FakeSession(), _store(tmp_path, "clean.db"))
    assert (lr, [t.to_dict() for t in trials]) == (uninterrupted[0], [t.to_dict() for t in uninterrupted[1]])


class Killed(Exception):
    pass


def test_an_extension_killed_before_its_rate_was_drawn_is_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between Optuna taking the enqueued extension (RUNNING, no params) and drawing its
    rate: the resumed search trains it under the same trial, marked as an extension, then
    decides the second extension as an uninterrupted run does."""
    import optuna

    real_ask = optuna.study.Study.ask

    def die_on_taking_an_extension(study: Any, fixed_distributions: Any = None) -> Any:
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if waiting and waiting[0].user_attrs.get("extension"):
            study._pop_waiting_trial_id()
            raise Killed
        return real_ask(study, fixed_distributions)

    store = _store(tmp_path)
    monkeypatch.setattr(optuna.study.Study, "ask", die_on_taking_an_extension)
    with pytest.raises(Killed):
        _search(FakeSession(best_lr=1.0), store)
    monkeypatch.undo()
    assert store.study(f"search:{LORA.name}").get_trials()[3].params == {}
    resumed = FakeSession(best_lr=1.0)
    lr, trials = _search(resumed, store)
    assert [lr for lr, _ in resumed.trained] == [1.8e-2, 5.4e-2]
    uninterrupted = _search(FakeSession(best_lr=1.0), _store(tmp_path, "clean.db"))
    assert (lr, [t.to_dict() for t in trials]) == (uninterrupted[0], [t.to_dict() for t in uninterrupted[1]])


def test_a_trial_killed_after_the_pruner_stopped_it_stays_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after the pruner decided to stop a trial but before the study was told (the run
    winding down, its attributes being written) leaves a RUNNING trial whose reports look as if
    it went on; the resumed search stops it at the same validation, as an uninterrupted run
    does, instead of training it to the end."""
    import optuna

    real_tell = optuna.study.Study.tell

    def die_before_telling_a_prune(
        study: Any, trial: Any, values: Any = None, state: Any = None, **kw: Any
    ) -> Any:
        if state == optuna.trial.TrialState.PRUNED:
            raise Killed
        return real_tell(study, trial, values, state, **kw)

    store = _store(tmp_path)
    monkeypatch.setattr(optuna.study.Study, "tell", die_before_telling_a_prune)
    with pytest.raises(Killed):
        _search(FakeSession(), store, "full")
    monkeypatch.undo()
    running = store.study(f"search:{LORA.name}").get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(running) == 1 and running[0].last_step == 5  # reported at the first rung, then killed
    resumed = FakeSession()
    lr, trials = _search(resumed, store, "full")
    assert resumed.trained[0] == (running[0].params["learning_rate"], 20)  # stopped at the rung again
    uninterrupted = _search(FakeSession(), _store(tmp_path, "clean.db"), "full")
    assert (lr, [t.to_dict() for t in trials]) == (uninterrupted[0], [t.to_dict() for t in uninterrupted[1]])
