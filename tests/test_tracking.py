"""``peftlab train --report-to``: what each tracker stored, read back through the real library
(TensorBoard's event files; mlflow's and trackio's local stores, offline): the settings, the loss,
learning rate and tokens/s per step, the evaluations; the YAML key; and a missing extra as a
one-line error naming the install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


# the run in a subprocess: mlflow and trackio read their stores' locations from the environment
# when imported, and nothing may reach the network or the home folder
TRAIN_AND_READ = """
import json, sys
from peftlab import cli
assert cli.main(json.loads(sys.argv[1])) == 0
if sys.argv[2] == "mlflow":
    import mlflow
    client = mlflow.MlflowClient()
    (run,) = client.search_runs(experiment_ids=["0"])
    history = {key: [[m.step, m.value] for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    found = {"name": run.info.run_name, "status": run.info.status, "params": run.data.params,
             "history": history}
else:
    import trackio
    from trackio.sqlite_storage import SQLiteStorage
    (run,) = trackio.Api().runs("peftlab")
    found = {"name": run.name, "config": run.config, "logs": SQLiteStorage.get_logs("peftlab", run.name)}
print(json.dumps(found))
"""


def _train_in_subprocess(tmp_path: Path, library: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``peftlab train --report-to LIBRARY`` offline, its store under ``tmp_path``; what the
    library reads back from its store, and the run's metrics.json."""
    model = save_tiny_causal_lm(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--task", "topic", "--steps", "4", "--batch-size", "4"]
    argv += ["--num-eval", "4", "--eval-every", "2", "--save-every", "0", "--out", str(out)]
    argv += ["--report-to", library]
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # mlflow's default, here
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
    }
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_READ, json.dumps(argv), library],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found, json.loads((out / "metrics.json").read_text())


def test_mlflow_run_holds_settings_and_metrics(tmp_path: Path) -> None:
    """Against the real mlflow (mlflow-skinny), in a local SQLite store."""
    found, metrics = _train_in_subprocess(tmp_path, "mlflow")
    assert found["name"] == "out" and found["status"] == "FINISHED"  # end_run was called
    params = found["params"]
    assert params["report_to"] == "mlflow" and params["precision.dtype"] == "float32"
    assert params["task"] == "topic" and params["steps"] == "4"
    history = found["history"]
    assert [step for step, _ in history["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in history["train/loss"]] == pytest.approx(metrics["history"]["losses"], rel=1e-6)
    lrs = [v for _, v in history["train/learning_rate"]]
    assert lrs == pytest.approx(metrics["history"]["learning_rates"], rel=1e-6)
    assert all(v > 0 for _, v in history["train/tokens_per_second"])
    assert [step for step, _ in history["eval/eval_loss"]] == [2, 4]
    assert history["eval/eval_loss"][-1][1] == pytest.approx(metrics["final_eval"]["eval_loss"])


def test_trackio_run_holds_settings_and_metrics(tmp_path: Path) -> None:
    """Against the real trackio, in its local store (TRACKIO_DIR), offline."""
    found, metrics = _train_in_subprocess(tmp_path, "trackio")
    assert found["name"] == "out"
    assert found["config"]["report_to"] == "trackio" and found["config"]["precision.dtype"] == "float32"
    logs = found["logs"]
    train = [row for row in logs if "train/loss" in row]
    assert [row["step"] for row in train] == [1, 2, 3, 4]
    assert [row["train/loss"] for row in train] == pytest.approx(metrics["history"]["losses"], rel=1e-6)
    lrs = [row["train/learning_rate"] for row in train]
    assert lrs == pytest.approx(metrics["history"]["learning_rates"], rel=1e-6)
    evals = [row for row in logs if "eval/eval_loss" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert evals[-1]["eval/eval_loss"] == pytest.approx(metrics["final_eval"]["eval_loss"])
    assert (tmp_path / "trackio" / "peftlab.db").is_file()


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
    from peftlab.training.settings import RunConfig

    with pytest.raises(
        ValueError, match="--report-to 'wandb': choose one of none, tensorboard, mlflow, trackio"
    ):
        RunConfig(task="topic", report_to="wandb")
