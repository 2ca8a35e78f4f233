"""Experiment tracking for ``peftlab train --report-to tensorboard|mlflow|trackio|none``.

Each tracker logs, through its library's own API, the run's settings once at the start, and
then per optimizer step the training loss, the learning rate and tokens per second (``train/``),
and each evaluation's metrics (``eval/``), with the step as the x axis. The libraries are
optional extras (a missing one is a one-line error naming the install), imported only when
asked for; only the main process of a distributed run reports.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing event files under
  ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``); the settings go in as text.
- ``mlflow``: ``mlflow.start_run`` / ``log_params`` / ``log_metrics`` / ``end_run`` against
  mlflow's tracking URI (``MLFLOW_TRACKING_URI``; mlflow's own default otherwise, a local store
  in the working folder).
- ``trackio``: ``trackio.init`` (the settings as its ``config``) / ``log`` / ``finish``, in
  trackio's local store (``TRACKIO_DIR``, by default under ``HF_HOME``) unless configured
  otherwise.

Both work offline on their local stores; tests/test_tracking.py reads each store back through
the real library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftlab.extras import require

REPORT_TO = ("none", "tensorboard", "mlflow", "trackio")


def check_report_to(value: str) -> None:
    if value not in REPORT_TO:
        raise ValueError(f"--report-to {value!r}: choose one of {', '.join(REPORT_TO)}")


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested settings as ``a.b`` keys with scalar values (lists and None as JSON text)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


class Tracker:
    """What the training run calls; a subclass per library."""

    name = "none"

    def log_config(self, settings: Mapping[str, Any]) -> None:
        """Record the run's settings (once, at the start)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and end the run."""


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: Path, run_name: str) -> None:
        require("tensorboard", "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.run_name = run_name

    def log_config(self, settings: Mapping[str, Any]) -> None:
        text = json.dumps(dict(settings), indent=2, default=str)
        # Markdown code block, so TensorBoard's text tab keeps the layout
        self.writer.add_text("config", "```\n" + text + "\n```", global_step=0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_name: str) -> None:
        self.mlflow = require("mlflow", "--report-to mlflow")
        self.run = self.mlflow.start_run(run_name=run_name)

    def log_config(self, settings: Mapping[str, Any]) -> None:
        # mlflow caps a parameter value's length; longer values are cut, not refused
        params = {k: str(v)[:500] for k, v in flatten(settings).items()}
        self.mlflow.log_params(params)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, project: str, run_name: str) -> None:
        self.trackio = require("trackio", "--report-to trackio")
        self.project = project
        self.run_name = run_name
        self.started = False

    def log_config(self, settings: Mapping[str, Any]) -> None:
        self.trackio.init(project=self.project, name=self.run_name, config=flatten(settings))
        self.started = True

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.started:
            self.log_config({})
        self.trackio.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.started:
            self.trackio.finish()


def make_tracker(report_to: str, out: Path, *, run_name: str, project: str = "peftlab") -> Tracker:
    """The tracker ``--report-to`` names (a no-op :class:`Tracker` for ``none``)."""
    check_report_to(report_to)
    if report_to == "tensorboard":
        return TensorBoardTracker(out / "tensorboard", run_name)
    if report_to == "mlflow":
        return MLflowTracker(run_name)
    if report_to == "trackio":
        return TrackioTracker(project, run_name)
    return Tracker()
