"""Prefix tuning against HF PEFT: same outputs for the same prefix, tensors and configs exchanged
both ways (PEFT is a test-only reference)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from conftest import build_model, sample_inputs
from peftlab import PeftConfig, PeftModel, PrefixTuningConfig, get_peft_model
from peftlab.core.registry import get_method

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}
TOKENS = 3
TOL = 1e-5
METHOD = get_method("PREFIX_TUNING")


def _ours(arch: str, **fields: Any) -> Any:
    torch.manual_seed(11)
    config = PrefixTuningConfig(task_type=TASKS[arch], num_virtual_tokens=TOKENS, **fields)
    return get_peft_model(build_model(arch), config)


def _peft(arch: str, **fields: Any) -> Any:
    torch.manual_seed(12)
    config = peft.PrefixTuningConfig(task_type=TASKS[arch], num_virtual_tokens=TOKENS, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build_model(arch), config)


def _logits(model: Any, inputs: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits


def _peft_positions_as_ours(arch: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT numbers real tokens from num_virtual_tokens (it adds that to given position ids).
    peftlab does the same with learned absolute positions (GPT-2, BART) and relative ones agree
    anyway (T5); on rotary models it numbers them from 0 and converts checkpoints instead, so for
    the same raw vectors these position ids make PEFT number them from 0."""
    if arch != "llama":
        return {}
    batch, q = inputs["input_ids"].shape
    return {"position_ids": (torch.arange(q) - TOKENS).expand(batch, -1)}


@pytest.mark.parametrize("arch", list(TASKS))
@pytest.mark.parametrize("projection", [False, True])
def test_outputs_equal_peft_for_the_same_prefix(arch: str, projection: bool) -> None:
    ours, theirs = _ours(arch, prefix_projection=projection), _peft(arch, prefix_projection=projection)
    # same parameter names and shapes (embedding, transform.0, transform.2), GQA included
    theirs.prompt_encoder["default"].load_state_dict(ours.model_adapters["default"].state_dict())
    inputs = sample_inputs(arch)
    expected = _logits(theirs, inputs, **_peft_positions_as_ours(arch, inputs))
    assert float((_logits(ours, inputs) - expected).abs().max()) < TOL
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("arch", list(TASKS))
def test_peftlab_prefix_runs_the_same_in_peft(arch: str) -> None:
    """Exported tensors (PEFT's numbering: rotary keys turned by num_virtual_tokens) give PEFT
    our outputs with PEFT's own positions."""
    ours, theirs = _ours(arch), _peft(arch)
    exported = METHOD.export_model_adapter(ours.model_adapters["default"])
    assert set(exported) == {"prompt_embeddings"}
    set_peft_model_state_dict(theirs, exported)
    inputs = sample_inputs(arch)
    assert float((_logits(ours, inputs) - _logits(theirs, inputs)).abs().max()) < TOL


@pytest.mark.parametrize("arch", list(TASKS))
def test_peft_prefix_runs_the_same_in_peftlab(arch: str) -> None:
    ours, theirs = _ours(arch), _peft(arch)
    METHOD.import_model_adapter(ours.model_adapters["default"], get_peft_model_state_dict(theirs))
    inputs = sample_inputs(arch)
    assert float((_logits(ours, inputs) - _logits(theirs, inputs)).abs().max()) < TOL
    # and back: the round trip gives PEFT its own tensor
    again = METHOD.export_model_adapter(ours.model_adapters["default"])["prompt_embeddings"]
    assert torch.allclose(again, get_peft_model_state_dict(theirs)["prompt_embeddings"], atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_absolute_positions_are_exchanged_as_is(arch: str) -> None:
    """Learned absolute positions: real tokens are numbered after the prefix in both libraries,
    so the vectors are exchanged unchanged and give the same outputs with PEFT's own positions."""
    ours, theirs = _ours(arch), _peft(arch)
    exported = METHOD.export_model_adapter(ours.model_adapters["default"])["prompt_embeddings"]
    assert torch.equal(exported, ours.model_adapters["default"].embedding.weight.detach())
    set_peft_model_state_dict(theirs, {"prompt_embeddings": exported})
    inputs = sample_inputs(arch)
    assert float((_logits(ours, inputs) - _logits(theirs, inputs)).abs().max()) < TOL


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_projection_saves_folded_vectors_like_peft(arch: str) -> None:
    ours = _ours(arch, prefix_projection=True)
    theirs = _peft(arch, prefix_projection=True)
    theirs.prompt_encoder["default"].load_state_dict(ours.model_adapters["default"].state_dict())
    exported = METHOD.export_model_adapter(ours.model_adapters["default"])["prompt_embeddings"]
    saved_by_peft = get_peft_model_state_dict(theirs)["prompt_embeddings"]
    assert exported.shape == saved_by_peft.shape == (TOKENS, 2 * 2 * ours.peft_config["default"].token_dim)
    inputs = sample_inputs(arch)
    # PEFT runs a saved projected prefix as plain vectors: so do we after importing it
    loaded = _ours(arch, prefix_projection=True)
    METHOD.import_model_adapter(loaded.model_adapters["default"], {"prompt_embeddings": saved_by_peft})
    assert loaded.model_adapters["default"].transform is None
    assert float((_logits(loaded, inputs) - _logits(theirs, inputs)).abs().max()) < TOL
    # and what we export runs in PEFT (as a plain prefix) like our projected one
    plain = _peft(arch)
    set_peft_model_state_dict(plain, {"prompt_embeddings": exported})
    assert float((_logits(ours, inputs) - _logits(plain, inputs)).abs().max()) < TOL


def _greedy_by_full_forwards(model: Any, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step: no cache, no generate()."""
    encoder_decoder = "decoder_input_ids" in inputs
    start = inputs["decoder_input_ids"] if encoder_decoder else inputs["input_ids"]
    tokens = start.clone()
    for _ in range(steps):
        if encoder_decoder:
            batch = {**inputs, "decoder_input_ids": tokens}
        else:
            batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        logits = _logits(model, batch)[:, -1]
        logits[:, 2 if not encoder_decoder else 1] = float("-inf")  # EOS forbidden, as min_new_tokens
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_cached_generation_equals_peft_greedy_decoding(arch: str) -> None:
    """PEFT 0.21's own generate() disagrees with itself (cached vs not) on transformers 5.24;
    the reference is therefore greedy decoding with PEFT's forward, step by step."""
    ours, theirs = _ours(arch), _peft(arch)
    set_peft_model_state_dict(theirs, METHOD.export_model_adapter(ours.model_adapters["default"]))
    inputs = sample_inputs(arch)
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
    reference = _greedy_by_full_forwards(theirs, inputs, steps=6)
    prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        generated = ours.generate(**prompt, **kwargs)
    assert torch.equal(generated, reference)


def test_configs_are_read_both_ways() -> None:
    ours = _ours("llama", prefix_projection=True)
    data = json.loads(ours.peft_config["default"].to_json_string())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown field for PEFT to drop
        read_by_peft = peft.PeftConfig.from_peft_type(**data)
    assert read_by_peft.token_dim == 16 and read_by_peft.num_attention_heads == 2
    assert read_by_peft.encoder_hidden_size == 16 and read_by_peft.prefix_projection
    theirs = _peft("t5")
    read_by_us = PeftConfig.from_dict(json.loads(json.dumps(theirs.peft_config["default"].to_dict())))
    assert isinstance(read_by_us, PrefixTuningConfig)
    assert (read_by_us.num_transformer_submodules, read_by_us.num_layers, read_by_us.token_dim) == (2, 2, 32)


@pytest.mark.parametrize("arch", list(TASKS))
@pytest.mark.parametrize("projection", [False, True])
def test_checkpoint_files_both_ways(arch: str, projection: bool, tmp_path: Path) -> None:
    """The same file gives the same outputs in both libraries, written by either, for every
    architecture both support (rotary, absolute and relative positions)."""
    inputs = sample_inputs(arch)
    ours = _ours(arch, prefix_projection=projection)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(build_model(arch), tmp_path / "ours")
    assert float((_logits(ours, inputs) - _logits(in_peft, inputs)).abs().max()) < TOL
    theirs = _peft(arch, prefix_projection=projection)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = PeftModel.from_pretrained(build_model(arch), tmp_path / "theirs")
    assert float((_logits(in_ours, inputs) - _logits(theirs, inputs)).abs().max()) < TOL
