"""peftlab models under transformers' Trainer (``peftlab.integrations.trainer.AdapterTrainer``):
training, adapter-only checkpoints, loading them back, exact resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother

from conftest import VOCAB, build_model, sample_inputs
from peftlab import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftlab.core.checkpoint import CheckpointError
from peftlab.integrations.trainer import AdapterTrainer, load_adapter_weights

# what Trainer writes besides the model in a checkpoint folder
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _data(n: int = 16, distinct: int = 4, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """A few fixed sequences repeated, so a few steps visibly lower the loss."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, VOCAB, (seq,), generator=g) for _ in range(distinct)]
    return [{"input_ids": seqs[i % distinct], "labels": seqs[i % distinct].clone()} for i in range(n)]


def _args(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "learning_rate": 2e-2,
        "seed": 0,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def _lora_model(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    # init_lora_weights=False: B != 0, so the adapter changes the outputs from the first step
    return get_peft_model(build_model("llama"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))


def _params(model: PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_parameters(name).items()}


def _base_params(model: PeftModel) -> dict[str, torch.Tensor]:
    adapter = {id(p) for n in model.peft_config for p in model.adapter_parameters(n).values()}
    return {k: p.detach().clone() for k, p in model.named_parameters() if id(p) not in adapter}


def test_trains_and_checkpoints_hold_only_the_adapter(tmp_path: Path) -> None:
    model = _lora_model()
    adapter_before, base_before = _params(model), _base_params(model)
    trainer = AdapterTrainer(
        model=model, args=_args(tmp_path, max_steps=8, save_steps=4), train_dataset=_data()
    )
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.05, losses
    after = _params(model)
    assert all(not torch.equal(after[k], adapter_before[k]) for k in after)
    for k, v in _base_params(model).items():
        assert torch.equal(v, base_before[k]), f"frozen base weight {k} changed"

    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for step in (4, 8):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert {p.name for p in ckpt.iterdir()} == ADAPTER_FILES | TRAINER_FILES
        weights = ckpt / "adapter_model.safetensors"
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
        # exactly the adapter's tensors: lora_A / lora_B of q_proj and v_proj in 2 layers
        assert len(keys) == len(after) == 8
        assert all(".lora_A." in k or ".lora_B." in k for k in keys)
        assert weights.stat().st_size < 0.1 * full_bytes

    # the last checkpoint is the trained adapter: loads with PeftModel.from_pretrained
    inputs = sample_inputs("llama")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path / "checkpoint-8")
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # save_model() writes the same adapter-only folder
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} >= ADAPTER_FILES
    assert not list((tmp_path / "final").glob("model*.safetensors"))


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def with_extra(model: PeftModel, seed: int) -> PeftModel:
        # a second, inactive adapter: saved in its sub-folder and restored on resume too
        model.add_adapter("extra", IA3Config(init_ia3_weights=False))
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in model.adapter_parameters("extra").values():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        return model

    full = with_extra(_lora_model(seed=0), seed=0)
    AdapterTrainer(model=full, args=_args(tmp_path / "a"), train_dataset=_data()).train()
    assert (tmp_path / "a" / "checkpoint-2" / "extra" / "adapter_model.safetensors").is_file()

    # a model with other initial adapter values: only the checkpoint can make it match
    resumed = with_extra(_lora_model(seed=1), seed=1)
    trainer = AdapterTrainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for name in ("default", "extra"):
        want, got = _params(full, name), _params(resumed, name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path: Path) -> None:
    model = _lora_model()
    data = _data()
    # "best" = highest eval loss: the first checkpoint, so loading it back is visible
    args = _args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = _params(PeftModel.from_pretrained(build_model("llama"), tmp_path / "checkpoint-2"))
    last = _params(PeftModel.from_pretrained(build_model("llama"), tmp_path / "checkpoint-4"))
    now = _params(model)
    for k, v in best.items():
        assert torch.equal(now[k], v)
        assert not torch.equal(last[k], v)


def test_activation_checkpointing_gives_the_same_training(tmp_path: Path) -> None:
    runs = []
    for checkpointing in (False, True):
        model = _lora_model()
        args = _args(
            tmp_path / str(checkpointing), save_strategy="no", activation_checkpointing=checkpointing
        )
        AdapterTrainer(model=model, args=args, train_dataset=_data()).train()
        assert model.get_base_model().model.layers[0].gradient_checkpointing is checkpointing
        runs.append(_params(model))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], atol=1e-6, rtol=0)


def test_label_smoothing_shifts_causal_lm_labels(tmp_path: Path) -> None:
    model = _lora_model()
    trainer = AdapterTrainer(
        model=model, args=_args(tmp_path, label_smoothing_factor=0.1), train_dataset=_data()
    )
    batch = sample_inputs("llama", batch=2, seq=9)
    labels = batch["input_ids"].clone()
    loss = trainer.compute_loss(model, {**batch, "labels": labels})
    with torch.no_grad():
        outputs = model(**batch)
    expected = LabelSmoother(epsilon=0.1)(outputs, labels, shift_labels=True)
    unshifted = LabelSmoother(epsilon=0.1)(outputs, labels, shift_labels=False)
    assert isinstance(loss, torch.Tensor)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=0)
    assert abs(float(unshifted) - float(expected)) > 1e-3


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="get_peft_model"):
        AdapterTrainer(model=build_model("llama"), args=_args(tmp_path), train_dataset=_data())

    trainer = AdapterTrainer(model=_lora_model(), args=_args(tmp_path / "run"), train_dataset=_data())
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    ia3 = get_peft_model(build_model("llama"), IA3Config())
    with pytest.raises(CheckpointError, match="LORA adapter but adapter 'default' of this model is IA3"):
        load_adapter_weights(ia3, ckpt)
    two = _lora_model()
    two.add_adapter("other", LoraConfig(r=2))
    before = _params(two)
    with pytest.raises(CheckpointError, match=r"no saved adapter for \['other'\]"):
        load_adapter_weights(two, ckpt)
    assert all(torch.equal(v, before[k]) for k, v in _params(two).items())  # nothing half-loaded
    with pytest.raises(FileNotFoundError):
        load_adapter_weights(two, os.fspath(tmp_path / "missing"))
