"""``peftlab train --report-to``: TensorBoard event files read back (loss, learning rate,
tokens/s, evaluations, the settings), the YAML key, mlflow's and trackio's calls through
stand-ins of their modules, and a missing extra as a one-line error naming the install."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from peftlab import cli
from peftlab.extras import MissingExtra
from peftlab.training.tracking import make_tracker
from test_training import save_tiny_causal_lm


def _train(tmp_path: Path, *extra: str) -> Path:
    model = save_tiny_causal_lm(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--task", "topic", "--steps", "4", "--batch-size", "4"]
    argv += ["--num-eval", "4", "--eval-every", "2", "--save-every", "0", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return out


def test_tensorboard_event_files_hold_the_run(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("report_to: tensorboard\nlr: 2e-3\n")
    out = _train(tmp_path, "--config", str(yaml_file))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/eval_loss"} <= set(scalars)
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert losses == pytest.approx(metrics["history"]["losses"], rel=1e-6)
    lrs = [e.value for e in events.Scalars("train/learning_rate")]
    assert lrs == pytest.approx(metrics["history"]["learning_rates"], rel=1e-6)
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_second"))
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [2, 4]
    assert events.Scalars("eval/eval_loss")[-1].value == pytest.approx(metrics["final_eval"]["eval_loss"])
    (text,) = events.Tensors("config/text_summary")
    config = text.tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard"' in config and '"lr": 0.002' in config


class _Recorder(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *args, **kwargs: self.calls.append((attr, args, kwargs))


@pytest.mark.parametrize("library", ["mlflow", "trackio"])
def test_mlflow_and_trackio_get_settings_metrics_and_an_end(
    library: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder(library)
    monkeypatch.setitem(sys.modules, library, recorder)
    _train(tmp_path, "--report-to", library)
    names = [name for name, _, _ in recorder.calls]
    if library == "mlflow":
        assert names[:2] == ["start_run", "log_params"] and names[-1] == "end_run"
        params = recorder.calls[1][1][0]
        assert params["report_to"] == "mlflow" and params["precision.dtype"] == "float32"
        logged = [(args[0], kwargs["step"]) for name, args, kwargs in recorder.calls if name == "log_metrics"]
    else:
        assert names[0] == "init" and names[-1] == "finish"
        assert recorder.calls[0][2]["config"]["report_to"] == "trackio"
        logged = [(args[0], kwargs["step"]) for name, args, kwargs in recorder.calls if name == "log"]
    steps = [step for metrics, step in logged if "train/loss" in metrics]
    assert steps == [1, 2, 3, 4]
    assert any("eval/eval_loss" in metrics for metrics, _ in logged)


@pytest.mark.parametrize("library", ["tensorboard", "mlflow", "trackio"])
def test_a_missing_tracker_is_one_line_naming_the_install(
    library: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, library, None)  # import fails as for a package not installed
    with pytest.raises(
        MissingExtra, match=rf"--report-to {library} needs .*pip install 'peftlab\[{library}\]'"
    ):
        make_tracker(library, tmp_path, run_name="x")


def test_unknown_report_to_is_refused() -> None:
    from peftlab.training.run import RunConfig

    with pytest.raises(
        ValueError, match="--report-to 'wandb': choose one of none, tensorboard, mlflow, trackio"
    ):
        RunConfig(task="topic", report_to="wandb")
