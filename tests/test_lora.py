"""LoRA: exact parameter counts and numerics against HF PEFT, Conv1D merging, bias modes, options."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from conftest import build_model, model_output, sample_inputs
from peftlab import LoraConfig, get_peft_model
from peftlab.core.injection import wrapped_modules
from peftlab.core.layers import AdaptedModule
from peftlab.methods.lora import LoraUnit
from suite_helpers import (
    assert_close,
    assert_equal,
    check_equal_to_peft,
    differs,
    loss_of,
    sub,
    weights,
)

GPT2: dict[str, Any] = {"fan_in_fan_out": True}  # PEFT wants it for Conv1D; peftlab detects the layout itself

# (arch, config kwargs valid for both libraries)
COUNT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"r": 16, "target_modules": "all-linear"}),
    ("llama", {"r": 4, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
    ("gpt2", {"r": 16, "target_modules": "all-linear", **GPT2}),
    ("t5", {"r": 16, "target_modules": "all-linear"}),
    ("bart", {"r": 16, "target_modules": "all-linear"}),
    ("bert", {"r": 16, "target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    ("bert", {"r": 8, "task_type": "SEQ_CLS"}),
    ("bert", {"r": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    ("gpt2", {"r": 4, "bias": "lora_only", **GPT2}),
    ("bert", {"r": 4, "bias": "all", "task_type": "SEQ_CLS"}),
    # target_modules=None: our architecture defaults must pick what PEFT's pick
    *[
        (arch, {"r": 8, **(GPT2 if arch == "gpt2" else {})})
        for arch in ("llama", "gpt2", "bert", "t5", "bart")
    ],
]


def count_id(case: tuple[str, dict[str, Any]]) -> str:
    arch, kw = case
    return arch + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "fan_in_fan_out")


@pytest.mark.parametrize(("arch", "kw"), COUNT_CASES, ids=[count_id(c) for c in COUNT_CASES])
def test_counts_equal_peft(arch: str, kw: dict[str, Any]) -> None:
    ours = get_peft_model(build_model(arch), LoraConfig(**kw))
    theirs = peft.get_peft_model(build_model(arch), peft.LoraConfig(**kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters_matches_peft(capsys: pytest.CaptureFixture[str]) -> None:
    kw: dict[str, Any] = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    get_peft_model(build_model("llama"), LoraConfig(**kw)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(build_model("llama"), peft.LoraConfig(**kw)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert ours == theirs
    assert ours.startswith("trainable params: 1,792 || all params: 26,528 || trainable%: 6.7551")


NUMERIC_CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    ("llama", {"r": 8, "lora_alpha": 16, "use_rslora": True}),
    ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **GPT2}),
    ("gpt2", {"r": 4, "lora_alpha": 8, "bias": "lora_only", **GPT2}),
    ("bert", {"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS", "bias": "all"}),
    ("t5", {"r": 4, "lora_alpha": 32, "target_modules": "all-linear", "use_rslora": True}),
    ("bart", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "fc1"]}),
]


@pytest.mark.parametrize(("arch", "kw"), NUMERIC_CASES, ids=[count_id(c) for c in NUMERIC_CASES])
def test_numerics_equal_peft(arch: str, kw: dict[str, Any]) -> None:
    check_equal_to_peft(arch, LoraConfig(init_lora_weights=False, **kw), peft.LoraConfig(**kw))


def test_gpt2_conv1d_merge_layout() -> None:
    model = get_peft_model(
        build_model("gpt2"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **GPT2)
    )
    wrapper = sub(model.base_model, "transformer.h.0.attn.c_attn")
    assert isinstance(wrapper, AdaptedModule) and isinstance(wrapper.base_layer, Conv1D)
    unit = wrapper.adapters["default"]
    assert isinstance(unit, LoraUnit)
    w0 = wrapper.base_layer.weight.detach().clone()  # (in, out) = (32, 96)
    assert unit.lora_A.weight.shape == (4, 32) and unit.lora_B.weight.shape == (96, 4)
    expected = w0 + 2.0 * (unit.lora_B.weight @ unit.lora_A.weight).T.detach()

    inputs = sample_inputs("gpt2")
    out = model_output(model, inputs)
    model.merge_adapter()
    assert wrapper.base_layer.weight.shape == w0.shape
    assert_close(wrapper.base_layer.weight.detach(), expected, atol=1e-6)
    assert_close(model_output(model, inputs), out)
    model.unmerge_adapter()
    assert_close(wrapper.base_layer.weight.detach(), w0, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_modes_train_the_right_biases(arch: str, bias: str) -> None:
    task = "SEQ_CLS" if arch == "bert" else None  # bert: a classifier head trained in full too
    model = get_peft_model(
        build_model(arch), LoraConfig(r=4, bias=bias, task_type=task, init_lora_weights=False)
    )
    names = {n for n, _ in model.named_parameters()}
    lora = {n for n in names if ".adapters.default." in n}
    head = {n for n in names if ".modules_to_save.default." in n}
    if bias == "all":
        biases = {n for n in names if n.endswith(".bias") and n not in lora | head}
        # the head's unused original: PEFT saves its bias but keeps it frozen, and so do we
        frozen_declared = {n for n in biases if ".original_module." in n}
        biases -= frozen_declared
    else:
        biases = {f"base_model.{n}.base_layer.bias" for n, _ in wrapped_modules(model.base_model)}
        frozen_declared = set()
    assert lora and biases and bool(head) == (arch == "bert")
    assert set(model.adapter_parameters("default")) == lora | head | biases | frozen_declared
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora | head | biases
    for path in model.adapter_parameters("default"):
        model.get_parameter(path)  # every declared path is a real one

    before = weights(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_of(model(**sample_inputs(arch))).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == lora | head | biases

    model.delete_adapter("default")
    assert not any(p.requires_grad for p in model.parameters())


def test_bias_none_leaves_every_bias_frozen() -> None:
    model = get_peft_model(build_model("gpt2"), LoraConfig(r=4, init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # gpt2's default target is c_attn: lora_A and lora_B in each of its 2 layers, nothing more
    assert len(trainable) == 2 * 2
    assert trainable == set(model.adapter_parameters("default"))
    assert all(".adapters.default." in n for n in trainable)
    # and every bias is there and frozen: the wrapped layers' own ones too
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    wrapped = {f"base_model.{n}.base_layer.bias" for n, _ in wrapped_modules(model.base_model)}
    assert len(wrapped) == 2 and wrapped <= set(biases)
    assert len(biases) == 2 * 6 + 1  # per layer: ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj; ln_f
    assert not any(p.requires_grad for p in biases.values())


@pytest.mark.parametrize("layers", [[1], 1])
def test_layers_to_transform(layers: list[int] | int) -> None:
    model = get_peft_model(build_model("llama"), LoraConfig(r=2, layers_to_transform=layers))
    assert {n for n, _ in wrapped_modules(model.base_model)} == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    }
    with pytest.raises(ValueError, match=r"in layers \[7\]"):
        get_peft_model(build_model("llama"), LoraConfig(r=2, layers_to_transform=[7]))


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_identity_inits_start_at_base(init: bool | str) -> None:
    base = build_model("llama")
    base_out = model_output(base, sample_inputs("llama"))
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=init))
    for name, p in model.adapter_parameters("default").items():
        if "lora_A" in name:
            assert p.abs().sum() > 0
        else:
            assert not p.any()
    assert_equal(model_output(model, sample_inputs("llama")), base_out)


def test_dropout_only_in_training() -> None:
    inputs = sample_inputs("llama")
    with_dropout = get_peft_model(
        build_model("llama"), LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False)
    )
    plain = get_peft_model(build_model("llama"), LoraConfig(r=4, init_lora_weights=False))
    plain.load_state_dict(with_dropout.state_dict())
    with_dropout.eval()
    assert_close(model_output(with_dropout, inputs), model_output(plain, inputs))
    with_dropout.train()
    torch.manual_seed(0)
    assert differs(model_output(with_dropout, inputs), model_output(plain, inputs))
