"""IA3: exact parameter counts and numerics against HF PEFT, feed-forward input scaling, merging."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from torch import nn

from conftest import build_model, model_output, sample_inputs
from peftlab import IA3Config, get_peft_model
from peftlab.core.injection import wrapped_modules
from peftlab.core.layers import AdaptedModule
from peftlab.methods.ia3 import IA3Unit
from suite_helpers import assert_close, check_equal_to_peft, sub

GPT2: dict[str, Any] = {"fan_in_fan_out": True}  # PEFT wants it for Conv1D; peftlab detects the layout itself

COUNT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    # feedforward_modules=None: the default FFN module down_proj still scales its input (1, 64)
    ("llama", {"target_modules": ["k_proj", "down_proj"]}),
    ("llama", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": []}),
    ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"], **GPT2}),
    (
        "bert",
        {
            "task_type": "SEQ_CLS",
            "target_modules": ["key", "value", "output.dense"],
            "feedforward_modules": ["output.dense"],
        },
    ),
    ("t5", {"target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]}),
    # target_modules=None: our architecture defaults must pick what PEFT's pick
    *[(arch, GPT2 if arch == "gpt2" else {}) for arch in ("llama", "gpt2", "bert", "t5", "bart")],
]


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    arch, kw = case
    return arch + "".join(f"-{k}={v}" for k, v in kw.items() if k != "fan_in_fan_out")


@pytest.mark.parametrize(("arch", "kw"), COUNT_CASES, ids=[case_id(c) for c in COUNT_CASES])
def test_counts_equal_peft(arch: str, kw: dict[str, Any]) -> None:
    ours = get_peft_model(build_model(arch), IA3Config(**kw))
    theirs = peft.get_peft_model(build_model(arch), peft.IA3Config(**kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


NUMERIC_CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {}),
    ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"], **GPT2}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"], **GPT2}),
    ("bert", {"task_type": "SEQ_CLS"}),
    ("t5", {}),
    ("bart", {"target_modules": ["k_proj", "v_proj", "fc1", "fc2"], "feedforward_modules": ["fc1", "fc2"]}),
]


@pytest.mark.parametrize(("arch", "kw"), NUMERIC_CASES, ids=[case_id(c) for c in NUMERIC_CASES])
def test_numerics_equal_peft(arch: str, kw: dict[str, Any]) -> None:
    check_equal_to_peft(arch, IA3Config(init_ia3_weights=False, **kw), peft.IA3Config(**kw))


def test_feedforward_scales_input_others_scale_output() -> None:
    model = get_peft_model(build_model("llama"), IA3Config(init_ia3_weights=False))
    down = sub(model.base_model, "model.layers.0.mlp.down_proj")
    v = sub(model.base_model, "model.layers.0.self_attn.v_proj")
    assert isinstance(down, AdaptedModule) and isinstance(v, AdaptedModule)
    l_down: torch.Tensor = sub(down, "adapters.default").ia3_l
    l_v: torch.Tensor = sub(v, "adapters.default").ia3_l
    assert l_down.shape == (1, 64) and l_v.shape == (16, 1)  # GQA: v has 2 heads x 8

    x_ff, x_attn = torch.randn(3, 64), torch.randn(3, 32)
    with torch.no_grad():
        assert_close(down(x_ff), down.base_layer(x_ff * l_down))
        assert_close(v(x_attn), v.base_layer(x_attn) * l_v.T)


def test_default_feedforward_modules_follow_the_targets() -> None:
    """feedforward_modules=None means the architecture's FFN modules among the targets (as PEFT)."""
    model = get_peft_model(build_model("llama"), IA3Config(target_modules=["k_proj", "down_proj"]))
    units = {n.rsplit(".", 1)[-1]: w.adapters["default"] for n, w in wrapped_modules(model.base_model)}
    assert isinstance(units["down_proj"], IA3Unit) and units["down_proj"].is_feedforward
    assert isinstance(units["k_proj"], IA3Unit) and not units["k_proj"].is_feedforward
    # targets without any FFN module are fine: nothing is feed-forward
    model = get_peft_model(build_model("llama"), IA3Config(target_modules=["k_proj", "v_proj"]))
    assert not any(w.adapters["default"].is_feedforward for _, w in wrapped_modules(model.base_model))


def test_feedforward_regex_targets_checked_against_model() -> None:
    # a regex cannot be checked on the config, so the subset rule is enforced at injection
    config = IA3Config(target_modules=r".*\.(k_proj|v_proj)", feedforward_modules=["down_proj"])
    base = build_model("llama")
    with pytest.raises(ValueError, match=r"feedforward_modules.*subset"):
        get_peft_model(base, config)
    assert not any(isinstance(m, AdaptedModule) for m in base.modules())


def test_merge_with_bias_and_conv1d() -> None:
    """gpt2's c_attn has a bias (scaled with the output) and the Conv1D (in, out) layout."""
    model = get_peft_model(build_model("gpt2"), IA3Config(init_ia3_weights=False))
    wrapper = sub(model.base_model, "transformer.h.0.attn.c_attn")
    w0, b0 = wrapper.base_layer.weight.detach().clone(), wrapper.base_layer.bias.detach().clone()
    scale = wrapper.adapters["default"].ia3_l.detach().flatten()
    model.merge_adapter()
    assert_close(wrapper.base_layer.weight.detach(), w0 * scale[None, :], atol=1e-6)
    assert_close(wrapper.base_layer.bias.detach(), b0 * scale, atol=1e-6)
    model.unmerge_adapter()
    assert_close(wrapper.base_layer.weight.detach(), w0, atol=1e-6)
    assert_close(wrapper.base_layer.bias.detach(), b0, atol=1e-6)


def test_irreversible_merge_refused_but_merge_and_unload_works() -> None:
    model = get_peft_model(build_model("llama"), IA3Config(init_ia3_weights=False))
    unit = sub(model.base_model, "model.layers.1.self_attn.k_proj").adapters["default"]
    with torch.no_grad():
        unit.ia3_l[0, 0] = 0.0
    inputs = sample_inputs("llama")
    out = model_output(model, inputs)
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    with pytest.raises(ValueError, match="too close to zero"):
        model.merge_adapter()
    assert model.merged_adapters == []
    for n, p in model.base_model.named_parameters():
        assert torch.equal(p, before[n]), n
    plain: nn.Module = model.merge_and_unload()
    assert_close(model_output(plain, inputs), out)
