"""A stand-in for :class:`peftlab.compare.session.Session` whose validation losses are a known
function of the learning rate, so the search can be tested without training a model."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peftlab.compare.options import RunSizes
from peftlab.compare.session import TrainOutcome, Validation
from peftlab.training.loop import TrainHistory, TrainingDiverged

BEST_LR = (
    6e-3  # inside the full grid around the lora preset's 2e-3; the quick grid's largest (2e-3, 6e-3, 6.67e-4)
)


class FakeSession:
    """Validation loss ``|log(lr / best_lr)| + 1 / k`` at the k-th validation: the best learning
    rate wins at every step (``best_lr`` outside the grid puts the optimum beyond its edge);
    rates at or above ``diverge_at`` diverge. ``pause_file``: when it exists, training at
    ``pause_lr`` stops there (for a kill)."""

    model_kind = "causal"

    def __init__(
        self,
        *,
        best_lr: float = BEST_LR,
        diverge_at: float = math.inf,
        pause_lr: float | None = None,
        pause_file: str = "",
    ) -> None:
        # trials pause at the search budget, a quarter into the schedule of the whole budget
        self.sizes = RunSizes(
            budget=160, batch_size=4, eval_every=4, patience=100, search_budget=40, val_size=8, num_eval=None
        )
        self.best_lr = best_lr
        self.diverge_at = diverge_at
        self.pause_lr = pause_lr
        self.pause_file = pause_file
        self.trained: list[tuple[float, int]] = []  # (lr, validations seen)

    def prepare(self, preset: Any, seed: int) -> tuple[Any, None]:
        return torch.nn.Linear(1, 1), None

    def train(
        self,
        model: Any,
        learning_rate: float,
        seed: int,
        *,
        budget: int,
        on_validation: Callable[[int, Validation], bool],
        desc: str,
        stop_at: int | None = None,
    ) -> TrainOutcome:
        if learning_rate >= self.diverge_at:
            raise TrainingDiverged(1, float("nan"))
        outcome = TrainOutcome(TrainHistory(), 0)
        assert budget == self.sizes.budget  # a trial runs on the final run's schedule
        validations = min(budget, stop_at or budget) // self.sizes.eval_every
        for k in range(1, validations + 1):
            if self.pause_lr is not None and math.isclose(learning_rate, self.pause_lr) and k == 3:
                Path(self.pause_file).write_text(str(os.getpid()))
                time.sleep(600)
            outcome.examples_seen = k * self.sizes.eval_every
            loss = abs(math.log(learning_rate / self.best_lr)) + 1 / k
            if on_validation(outcome.examples_seen, Validation(loss, None)):
                outcome.reason = "stopped"
                break
        else:
            outcome.reason = "paused" if outcome.examples_seen < budget else "budget"
        self.trained.append((learning_rate, outcome.examples_seen))
        return outcome
