"""Training checkpoints: atomic step folders, pickle-free state, and exact resume after a real
SIGKILL of ``python -m peftlab train`` (the final adapter is bit-identical to an uninterrupted
run), plus the errors a wrong resume gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model
from peftlab import LoraConfig, cli, get_peft_model
from peftlab.training.checkpoints import (
    decode_state,
    encode_state,
    latest_checkpoint,
    read_state,
    save_checkpoint,
    step_folders,
    write_state,
)
from peftlab.training.encoding import Encoded
from peftlab.training.loop import TrainConfig, TrainLoop
from test_training import save_tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def _env() -> dict[str, str]:
    # one thread: the tiny model's ops are microseconds, and the runs must match bit for bit
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _args(model_dir: Path, out: Path, steps: int = 60) -> list[str]:
    # dropout, accumulation, warmup + cosine and evaluations in between: every piece of state
    # (RNG, data position, optimizer, scheduler) has to come back for the result to match
    return [
        "train", "--model", str(model_dir), "--task", "topic", "--method", "lora",
        "--lora-dropout", "0.1", "--target-modules", "all-linear", "--steps", str(steps),
        "--batch-size", "4", "--grad-accum", "2", "--lr", "5e-3", "--lr-schedule", "cosine",
        "--warmup-steps", "3", "--save-every", "4", "--keep-checkpoints", "2",
        "--eval-every", "20", "--num-eval", "4", "--out", str(out),
    ]  # fmt: skip


def _peftlab(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "peftlab", *args], stdout=fh, stderr=subprocess.STDOUT, env=_env()
        )


def _split_safetensors(path: Path) -> tuple[object, bytes]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def test_resume_after_sigkill_is_bit_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = _peftlab(_args(tiny_model_dir, reference), tmp_path / "reference.log")

    run = _peftlab(_args(tiny_model_dir, killed), tmp_path / "killed.log")
    deadline = time.monotonic() + 120
    while not step_folders(killed / "checkpoints") and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert not (killed / "adapter_model.safetensors").exists()  # it really died mid-run
    assert uninterrupted.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()[-2000:]
    resumed_from = latest_checkpoint(killed / "checkpoints")
    assert resumed_from is not None

    resumed = _peftlab([*_args(tiny_model_dir, killed), "--resume"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert f"resuming from {resumed_from}" in (tmp_path / "resumed.log").read_text()

    name = "adapter_model.safetensors"
    # same header (safetensors writes its metadata map in no fixed order) and same tensor bytes
    assert _split_safetensors(killed / name) == _split_safetensors(reference / name)
    a, b = load_file(killed / name), load_file(reference / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trajectory too: every step's loss, and the evaluations, as in the uninterrupted run
    ref, res = (json.loads((d / "metrics.json").read_text()) for d in (reference, killed))
    assert res["history"]["losses"] == ref["history"]["losses"] and len(ref["history"]["losses"]) == 60
    assert res["evals"] == ref["evals"] and [e["step"] for e in ref["evals"]] == [20, 40, 60]
    assert [s for s, _ in step_folders(killed / "checkpoints")] == [56, 60]  # keep the newest 2


def _loop(seed: int = 0) -> TrainLoop:
    model = get_peft_model(build_model("llama"), LoraConfig(r=4, lora_dropout=0.2, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(10):
        ids = torch.randint(3, 96, (9,), generator=g).tolist()
        data.append(Encoded(ids, [-100] * 4 + ids[4:]))
    config = TrainConfig(steps=6, batch_size=3, learning_rate=1e-2, grad_accum=2, lr_schedule="cosine")
    return TrainLoop(model, data, config, pad_token_id=0)


def test_loop_state_round_trips_through_json_and_safetensors(tmp_path: Path) -> None:
    from peftlab.training.loop import rng_state

    full = _loop()
    full.run(progress=False)

    part = _loop()
    saved: dict[str, object] = {}

    def stop_at_3(loop: TrainLoop) -> None:
        if loop.step == 3:
            write_state(tmp_path, "trainer", {**loop.state_dict(), "rng": rng_state()})
            saved["params"] = {
                n: p.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad
            }
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        part.run(progress=False, on_step=stop_at_3)
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "trainer.safetensors").is_file()

    resumed = _loop()
    state = read_state(tmp_path, "trainer")
    assert isinstance(state["optimizer"]["state"], dict) and 0 in state["optimizer"]["state"]  # int keys kept
    with torch.no_grad():
        for name, p in resumed.model.named_parameters():
            if p.requires_grad:
                p.copy_(saved["params"][name])  # type: ignore[index]
    resumed.load_state_dict(state)
    resumed.resume_rng = state["rng"]
    resumed.run(progress=False)
    assert resumed.history.losses == full.history.losses
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_codec_keeps_types() -> None:
    state = {
        "t": torch.arange(3.0),
        "scalar": torch.tensor(2.5),
        1: {"tuple": (1, 2.5, "x", None, True), "list": [float("inf"), [torch.ones(2, dtype=torch.uint8)]]},
        "__odd": 1,
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    decoded = decode_state(json.loads(json.dumps(encoded)), tensors)
    assert set(decoded) == {"t", "scalar", 1, "__odd"}
    assert torch.equal(decoded["t"], state["t"]) and decoded["scalar"].shape == ()
    assert decoded[1]["tuple"] == (1, 2.5, "x", None, True)
    assert decoded[1]["list"][0] == float("inf") and decoded[1]["list"][1][0].dtype == torch.uint8
    with pytest.raises(TypeError, match="cannot store a set"):
        encode_state({"s": {1}}, {})


def test_checkpoint_folders_are_atomic_and_rotated(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"

    def write(folder: Path) -> None:
        (folder / "a.txt").write_text("ok")

    for step in (2, 4, 6):
        save_checkpoint(root, step, write, keep=2)
    assert [s for s, _ in step_folders(root)] == [4, 6]

    def crash(folder: Path) -> None:
        (folder / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 8, crash, keep=2)
    # the failed save left nothing behind, and the newest complete checkpoint is unchanged
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]
    assert latest_checkpoint(root) == root / "step-6"
    # a temporary folder left by a kill is ignored, then cleaned by the next save
    (root / ".step-8.dead.tmp").mkdir()
    assert latest_checkpoint(root) == root / "step-6"
    save_checkpoint(root, 8, write, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-6", "step-8"]


def _quick(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--task", "topic", "--steps", "4", "--batch-size", "2",
        "--save-every", "2", "--num-eval", "0", "--out", str(out), *extra,
    ]  # fmt: skip


def test_resume_errors(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # --resume with nothing to resume starts from step 0
    assert cli.main([*_quick(tiny_model_dir, out), "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().out
    # a second run into the same folder must say --resume
    assert cli.main(_quick(tiny_model_dir, out)) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    # settings that change the trajectory must match the checkpoint
    assert cli.main([*_quick(tiny_model_dir, out, "--lr", "0.5", "--seed", "3"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        "belongs to a run with other settings" in err and "lr: 0.002 -> 0.5" in err and "seed: 0 -> 3" in err
    )
    # ... but not output-only ones; the run is complete, so nothing is trained again
    assert cli.main([*_quick(tiny_model_dir, out, "--keep-checkpoints", "5"), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    # a damaged checkpoint is a clear error, not a crash
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None
    (newest / "optimizer.safetensors").write_bytes(b"\x00\x01")
    assert cli.main([*_quick(tiny_model_dir, out), "--resume"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    # the same settings on other data (a file edited in place) are refused too
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"say {i}", "completion": f" {i}"}) + "\n" for i in range(8))
    )
    other = tmp_path / "other"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--steps", "2", "--batch-size", "2"]
    argv += ["--save-every", "1", "--num-eval", "0", "--out", str(other)]
    assert cli.main(argv) == 0
    data.write_text(
        "".join(json.dumps({"prompt": f"say {i}", "completion": f" {i + 1}"}) + "\n" for i in range(8))
    )
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 2
    assert "the training data differs" in capsys.readouterr().err
