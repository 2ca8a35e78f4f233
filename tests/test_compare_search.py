"""The learning-rate search: it picks the rate that is known to win, Optuna's pruner really stops
the losing trials, a diverging rate is recorded and skipped, and a search killed mid-trial
finishes as if it had never been interrupted."""

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
from peftlab.compare.search import grid, search_learning_rate
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


def test_a_finished_search_is_reused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = _search(FakeSession(), store)
    again = FakeSession()
    assert _search(again, store) == first and again.trained == []


KILLED = """
import sys
sys.path.insert(0, sys.argv[1])
from compare_fakes import FakeSession
from peftlab.compare.search import search_learning_rate
from peftlab.compare.store import Store
from peftlab.presets import PRESETS
session = FakeSession(pause_lr=6e-3, pause_file=sys.argv[3])
search_learning_rate(session, Store(sys.argv[2]), PRESETS["lora"], "quick")
"""


def test_sigkill_mid_trial_loses_only_that_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    paused = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(TESTS), url, str(paused)])
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
    # the finished first trial is kept; the killed one is trained again, then the rest
    assert [lr for lr, _ in resumed.trained] == [6e-3, 6.67e-4]
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
