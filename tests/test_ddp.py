"""Data parallelism: ``torchrun --nproc_per_node=2 -m peftlab train`` (gloo on CPU) ends with
the adapter a single process gets from the same global batch, and resumes exactly.

Tolerance: the two runs add the same per-example gradients in a different order (per rank,
then DDP's all-reduce), so they agree to fp32 rounding amplified a little by AdamW over the
steps: we require |a - b| <= 1e-6 + 1e-5 |b| (observed ~1e-7)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab import cli
from test_training import save_tiny_causal_lm

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(model_dir: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--task", "topic", "--steps", "6",
        "--batch-size", str(batch_size), "--grad-accum", "2", "--lr", "5e-3", "--warmup-steps", "1",
        "--save-every", "3", "--keep-checkpoints", "2", "--num-eval", "4", "--out", str(out),
    ]  # fmt: skip


def _torchrun(args: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "peftlab", *args,
    ]  # fmt: skip
    with open(log, "wb") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=300)
    assert done.returncode == 0, log.read_text()[-3000:]


def test_two_processes_match_one_and_resume_exactly(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # 2 processes x batch 2 x accumulation 2 = one process x batch 4 x accumulation 2
    _torchrun(_settings(tiny_model_dir, ddp, batch_size=2), tmp_path / "ddp.log")
    assert cli.main(_settings(tiny_model_dir, single, batch_size=4)) == 0

    name = "adapter_model.safetensors"
    a, b = load_file(ddp / name), load_file(single / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    ddp_metrics, single_metrics = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert ddp_metrics["world_size"] == 2 and ddp_metrics["global_batch_size"] == 8
    assert ddp_metrics["history"]["losses"] == pytest.approx(single_metrics["history"]["losses"], rel=1e-5)
    assert ddp_metrics["history"]["tokens"] == single_metrics["history"]["tokens"]
    log = (tmp_path / "ddp.log").read_text()
    assert log.count("peftlab train: lora on") == 1  # only rank 0 reports
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-3", "step-6"]

    # resume: drop the last checkpoint and the outputs, continue from step 3 with 2 processes
    final = load_file(ddp / name)
    shutil.rmtree(ddp / "checkpoints" / "step-6")
    for f in (name, "metrics.json", "run_config.json", "adapter_config.json"):
        (ddp / f).unlink()
    _torchrun([*_settings(tiny_model_dir, ddp, batch_size=2), "--resume"], tmp_path / "resume.log")
    assert f"resuming from {ddp / 'checkpoints' / 'step-3'}" in (tmp_path / "resume.log").read_text()
    again = load_file(ddp / name)
    assert all(torch.equal(again[k], final[k]) for k in final)

    # resuming with another number of processes is refused: shards and RNG streams are per rank
    capsys.readouterr()
    assert cli.main([*_settings(tiny_model_dir, ddp, batch_size=2), "--resume"]) == 2
    assert "was written by 2 processes but this run has 1" in capsys.readouterr().err


def test_two_processes_match_one_on_an_encoder_decoder(tmp_path: Path) -> None:
    """The same on a tiny T5 (rows as encoder input and decoder targets): two processes end with
    the adapter one process gets from the same global batch."""
    from test_seq2seq import _generation_data, _save_tiny

    model = _save_tiny(tmp_path / "t5", "t5")
    # no dropout: each process draws its own dropout masks, so with it the two runs differ
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    data = _generation_data(tmp_path / "rows.jsonl")

    def settings(out: Path, batch_size: int) -> list[str]:
        return [
            "train", "--model", str(model), "--data", str(data), "--method", "lora", "--steps", "4",
            "--batch-size", str(batch_size), "--grad-accum", "2", "--lr", "5e-3", "--save-every", "0",
            "--num-eval", "4", "--out", str(out),
        ]  # fmt: skip

    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _torchrun(settings(ddp, batch_size=2), tmp_path / "ddp.log")
    assert cli.main(settings(single, batch_size=4)) == 0
    name = "adapter_model.safetensors"
    a, b = load_file(ddp / name), load_file(single / name)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    ddp_metrics, single_metrics = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert ddp_metrics["world_size"] == 2 and ddp_metrics["model_kind"] == "seq2seq"
    assert ddp_metrics["history"]["losses"] == pytest.approx(single_metrics["history"]["losses"], rel=1e-5)
