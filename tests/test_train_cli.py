"""``peftlab train`` on a tiny llama with an offline tokenizer: settings (flags, run files and
their errors), bad data rows, every method's saved output loading back to the same model, a
run that learns, gradient checkpointing, and the stop on a NaN/inf loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftlab import PeftModel, cli
from peftlab.cli.train import parse_target_modules
from peftlab.training.encoding import pad_id
from peftlab.training.evaluation import evaluate_loss
from peftlab.training.run import run_training
from peftlab.training.settings import RunConfig, merge_settings, read_run_file
from test_training import save_tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def _logits(model: torch.nn.Module, text_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([text_ids])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ---- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no training data: give --data FILE"),
        (["--task", "topic", "--method", "bottleneck", "--r", "4"], "--method bottleneck has no option 'r'"),
        (
            ["--task", "topic", "--method-option", "rank=4"],
            "--method lora has no option 'rank'; its options are",
        ),
        (
            ["--task", "topic", "--method", "full", "--lora-alpha", "8"],
            "takes no method options; got lora_alpha",
        ),
        (["--task", "topic", "--method-option", "rank"], "expected KEY=VALUE"),
        (["--task", "topic", "--method-option", "r=4", "--r", "8"], "'r' is given twice"),
        (["--task", "topic", "--lora-dropout", "1.5"], "lora_dropout: must be a number in [0, 1)"),
        (["--task", "topic", "--steps", "3", "--epochs", "1"], "either --steps or --epochs"),
        (["--task", "topic", "--eval-fraction", "0.2"], "--eval-fraction applies only to --data"),
        (["--task", "topic", "--batch-size", "0"], "batch_size: must be an integer >= 1"),
        (["--task", "topic", "--gguf-file", "m.gguf"], "--gguf-file needs --model"),
        (["--task", "no-such-task"], "unknown task 'no-such-task'"),
    ],
)
def test_bad_settings_are_clear_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing loaded or written


def test_run_files_and_flags(tmp_path: Path) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        "method: lora\nr: 4\nmethod_options:\n  lora_dropout: 0.1\ntarget-modules: [q_proj]\n"
        "task: topic\nepochs: 2\nlr: 1e-3\nweight_decay: 1.0e-2\n"
    )
    settings = read_run_file(run_yaml)
    assert settings["lr"] == 1e-3 and settings["weight_decay"] == 0.01  # 1e-3 is a string to YAML 1.1
    assert settings["method_options"] == {"r": 4, "lora_dropout": 0.1, "target_modules": ["q_proj"]}
    # a flag replaces the file's value, its exclusive partner, and merges into method options
    merged = merge_settings(settings, {"steps": 5, "data": "d.jsonl", "method_options": {"r": 16}})
    assert merged["steps"] == 5 and "epochs" not in merged
    assert merged["data"] == "d.jsonl" and "task" not in merged
    assert merged["method_options"] == {"r": 16, "lora_dropout": 0.1, "target_modules": ["q_proj"]}
    config = RunConfig.from_dict(merged)
    assert config.peft_config().r == 16  # type: ignore[union-attr]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "topic", "lerning_rate": 1e-3, "batch": 2}))
    with pytest.raises(
        ValueError, match=r"unknown keys 'batch', 'lerning_rate'; known keys are .*batch_size"
    ):
        read_run_file(bad)
    bad.write_text(json.dumps({"r": 4, "method_options": {"r": 8}}))
    with pytest.raises(ValueError, match="'r' is given twice"):
        read_run_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping"):
        read_run_file(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_run_file(bad)
    with pytest.raises(ValueError, match=r"use \.json, \.yaml or \.yml"):
        read_run_file(tmp_path / "run.toml")
    with pytest.raises(ValueError, match="batch_size: must be an integer"):
        RunConfig.from_dict({"task": "topic", "batch_size": "8"})
    from peftlab.training.run import total_steps

    assert total_steps(RunConfig(task="topic"), 256, 8) == 32  # one epoch by default
    assert total_steps(RunConfig(task="topic", epochs=1.5), 250, 8) == 47  # rounded up
    assert total_steps(RunConfig(task="topic", steps=5), 256, 8) == 5
    assert parse_target_modules("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    assert parse_target_modules("q_proj") == ["q_proj"]


def test_run_file_drives_a_run_and_flags_override(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_json = tmp_path / "run.json"
    run_json.write_text(
        json.dumps(
            {
                "model": str(tiny_model_dir),
                "method": "ia3",
                "task": "topic",
                "epochs": 1,
                "batch-size": 2,
                "num_eval": 2,
                "out": str(out),
                "save_every": 0,
            }
        )
    )
    assert cli.main(["train", "--config", str(run_json), "--steps", "3", "--lr-schedule", "constant"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["config"]["method"] == "ia3"
    assert metrics["config"]["lr_schedule"] == "constant" and metrics["config"]["epochs"] is None
    assert metrics["history"]["learning_rates"] == [0.02] * 3  # ia3's default LR, constant
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert not (out / "checkpoints").exists()  # save_every 0


def test_bad_data_rows_name_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:3: missing field 'completion'" in capsys.readouterr().err
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\ngood movie,pos\nbad movie,neg\nso so,\n")
    assert cli.main(["train", "--data", str(csv), "--out", str(tmp_path / "o")]) == 2
    assert f"{csv}:4: missing field 'label'" in capsys.readouterr().err


# ---- runs -------------------------------------------------------------------------------


def test_training_learns_and_saves_a_peft_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    rows = [
        (f"{w} {v} again", label) for w, label in (("goal", "sports"), ("oven", "food")) for v in range(12)
    ]
    data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    config = RunConfig(
        model=str(tiny_model_dir),
        data=str(data),
        eval_fraction=0.25,
        method_options={"r": 8, "target_modules": "all-linear"},
        steps=30,
        batch_size=6,
        lr=1e-2,
        warmup_steps=2,
        num_eval=6,
        out=str(tmp_path / "out"),
        save_every=0,
    )
    result = run_training(config)
    model, tok = result.model, result.tokenizer
    assert isinstance(model, PeftModel)
    final = result.metrics["final_eval"]
    assert {"eval_loss", "accuracy"} <= set(final)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["final_eval"] == final
    # LoRA starts as the base model (B = 0): the base's held-out loss is the starting point
    from peftlab.training.encoding import encode_examples
    from peftlab.training.run import load_run_task

    held_out = encode_examples(tok, load_run_task(config).eval, 256)
    with model.disable_adapter():
        before = evaluate_loss(model, held_out, pad_token_id=pad_id(tok))
    # the tiny model's lm_head (init std 0.02, frozen) caps how far the loss can fall from ln(400)
    assert final["eval_loss"] < before - 0.3
    losses = result.metrics["history"]["losses"]
    assert sum(losses[-5:]) < sum(losses[:5]) - 1.5

    ids = tok("Text: goal 3 again\nLabel (food / sports):")["input_ids"]
    expected = _logits(model, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "out")
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    hf = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out"
    )
    torch.testing.assert_close(_logits(hf, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["ia3", "bottleneck", "prefix", "full"])
def test_every_method_saves_what_loads_back(method: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = {"bottleneck": {"bottleneck_size": 4}, "prefix": {"num_virtual_tokens": 3}}.get(method, {})
    config = RunConfig(
        model=str(tiny_model_dir),
        task="topic",
        method=method,
        method_options=options,
        steps=2,
        batch_size=2,
        lr=1e-2,
        num_eval=2,
        out=str(out),
        save_every=2,
    )
    result = run_training(config)
    ids = result.tokenizer("Classify the topic: the guitar and the piano")["input_ids"]
    expected = _logits(result.model, ids)
    if method == "full":
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert not (out / "checkpoints" / "step-2" / "adapter").exists()
        assert (out / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    else:
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
        # the checkpoint's adapter is the same (final step == checkpoint step)
        again = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "checkpoints" / "step-2" / "adapter"
        )
        torch.testing.assert_close(_logits(again, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-4)  # training changed something


def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    def run(flag: bool) -> PeftModel:
        config = RunConfig(
            model=str(tiny_model_dir),
            task="topic",
            steps=3,
            batch_size=4,
            gradient_checkpointing=flag,
            method_options={"lora_dropout": 0.2},  # recomputation must replay the same dropout
            num_eval=0,
            save_every=0,
            out=str(tmp_path / f"gc-{flag}"),
        )
        model = run_training(config).model
        assert isinstance(model, PeftModel)
        enabled = getattr(model.base_model, "is_activation_checkpointing", None)  # newer transformers
        if enabled is None:
            enabled = model.base_model.is_gradient_checkpointing
        assert enabled is flag
        return model

    plain, checkpointed = run(False), run(True)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--task", "topic", "--steps", "6", "--batch-size", "4"]
    argv += ["--save-every", "1", "--num-eval", "0", "--out", str(out), "--lr", "1e30"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "became nan at step 2; lower the learning rate (--lr is 1e+30)" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-1'}" in err
    assert not (out / "adapter_model.safetensors").exists()


def test_injected_nan_loss_stops_before_the_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import peftlab.training.loop as training

    real = training.supervised_loss_sum
    calls = {"n": 0}

    def poisoned(forward: Any, model: Any, batch: Any, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(forward, model, batch, labels)
        return loss * float("inf") if calls["n"] == 5 else loss  # step 3's first micro-batch

    monkeypatch.setattr(training, "supervised_loss_sum", poisoned)
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--task", "topic", "--steps", "6", "--batch-size", "2"]
    argv += ["--grad-accum", "2", "--save-every", "2", "--num-eval", "0", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "loss became inf at step 3; lower the learning rate (--lr is 0.002)" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-2'}" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
