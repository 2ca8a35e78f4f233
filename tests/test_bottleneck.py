"""Bottleneck adapters: placement per architecture, identity and non-identity inits, training
touches only adapters, exact counts, no merging, checkpoints, and the lesson's snippet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn

from conftest import build_model, model_output, sample_inputs
from peftlab import (
    AdapterConfig,
    BottleneckConfig,
    HoulsbyConfig,
    PeftConfig,
    PeftModel,
    PfeifferConfig,
    get_peft_model,
)
from peftlab.core.injection import wrapped_modules
from peftlab.methods.bottleneck import BottleneckUnit

ATOL = 1e-5
D_MODEL = 32  # every tiny model in conftest
# (attention-output, FFN-output) modules per architecture in conftest's 2-layer models;
# t5 / bart decoders also carry cross-attention outputs
POSITIONS = {
    "llama": (2, 2),
    "gpt2": (2, 2),
    "bert": (2, 2),
    "t5": (6, 4),
    "bart": (6, 4),
}
MH_SUFFIXES = {
    "llama": ("self_attn.o_proj",),
    "gpt2": ("attn.c_proj",),
    "bert": ("attention.output.dense",),
    "t5": ("SelfAttention.o", "EncDecAttention.o"),
    "bart": ("self_attn.out_proj", "encoder_attn.out_proj"),
}


def per_position(d: int, b: int) -> int:
    """Parameters of one adapter module: down (b x d + b) and up (d x b + d)."""
    return d * b + b + b * d + d


def adapter_units(model: PeftModel, name: str = "default") -> list[BottleneckUnit]:
    units = [w.adapters[name] for _, w in wrapped_modules(model.base_model) if name in w.adapters]
    assert all(isinstance(u, BottleneckUnit) for u in units)
    return units  # type: ignore[return-value]


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-4)


# ---- placement ------------------------------------------------------------------------------
def test_default_placement(arch: str) -> None:
    model = get_peft_model(build_model(arch), BottleneckConfig())
    names = [n for n, w in wrapped_modules(model.base_model) if "default" in w.adapters]
    mh = [n for n in names if n.endswith(MH_SUFFIXES[arch])]
    n_mh, n_ffn = POSITIONS[arch]
    assert len(mh) == n_mh
    assert len(names) - len(mh) == n_ffn


def test_pfeiffer_places_ffn_only_and_houlsby_both(arch: str) -> None:
    pfeiffer = get_peft_model(build_model(arch), PfeifferConfig())
    names = [n for n, _ in wrapped_modules(pfeiffer.base_model)]
    assert len(names) == POSITIONS[arch][1]
    assert not any(n.endswith(MH_SUFFIXES[arch]) for n in names)
    houlsby = get_peft_model(build_model(arch), HoulsbyConfig())
    assert len(list(wrapped_modules(houlsby.base_model))) == sum(POSITIONS[arch])


# ---- outputs --------------------------------------------------------------------------------
def test_zeros_init_is_exactly_the_base(arch: str) -> None:
    inputs = sample_inputs(arch)
    base = build_model(arch)
    expected = model_output(base, inputs)
    model = get_peft_model(base, BottleneckConfig(init_weights="zeros", reduction_factor=4))
    units = adapter_units(model)
    # the down-projection is live (so training moves the up-projection), the up is zero
    assert all(u.adapter_down.weight.abs().sum() > 0 for u in units)
    assert torch.equal(model_output(model, inputs), expected)
    # the adapter is in the forward path: moved away from zero it changes the output
    with torch.no_grad():
        for p in model.adapter_parameters("default").values():
            p.normal_(std=0.5)
    assert differs(model_output(model, inputs), expected)
    with model.disable_adapter():
        assert torch.equal(model_output(model, inputs), expected)


@pytest.mark.parametrize("init", ["bert", "houlsby"])
def test_random_inits_change_outputs(arch: str, init: str) -> None:
    inputs = sample_inputs(arch)
    base = build_model(arch)
    expected = model_output(base, inputs)
    model = get_peft_model(base, BottleneckConfig(init_weights=init, reduction_factor=2))
    out = model_output(model, inputs)
    assert not torch.equal(out, expected)
    with model.disable_adapter():
        assert torch.equal(model_output(model, inputs), expected)


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "silu", "swish", "tanh"])
def test_unit_computes_residual_bottleneck(non_linearity: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    config = BottleneckConfig(bottleneck_size=5, non_linearity=non_linearity)
    unit = BottleneckUnit(base, config)
    with torch.no_grad():
        unit.adapter_down.bias.normal_()
        unit.adapter_up.bias.normal_()
    y = torch.randn(3, 4, 16)
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}[non_linearity]
    h = act(y @ unit.adapter_down.weight.T + unit.adapter_down.bias)
    expected = y + h @ unit.adapter_up.weight.T + unit.adapter_up.bias
    torch.testing.assert_close(unit.post(y), expected, atol=ATOL, rtol=0)
    assert unit.adapter_down.weight.shape == (5, 16) and unit.adapter_up.weight.shape == (16, 5)


@pytest.mark.parametrize(("init", "std"), [("bert", 0.02), ("houlsby", 0.01), ("zeros", None)])
def test_init_statistics(init: str, std: float | None) -> None:
    torch.manual_seed(0)
    unit = BottleneckUnit(nn.Linear(256, 256), BottleneckConfig(reduction_factor=2, init_weights=init))
    assert torch.count_nonzero(unit.adapter_down.bias) == 0
    assert torch.count_nonzero(unit.adapter_up.bias) == 0
    down_std = float(unit.adapter_down.weight.detach().std())
    up = unit.adapter_up.weight.detach()
    if std is None:
        assert torch.count_nonzero(up) == 0
        assert down_std == pytest.approx(0.02, rel=0.05)
    else:
        assert down_std == pytest.approx(std, rel=0.05)
        assert float(up.std()) == pytest.approx(std, rel=0.05)


# ---- training -------------------------------------------------------------------------------
def test_training_step_changes_only_adapter_parameters(arch: str) -> None:
    model = get_peft_model(build_model(arch), BottleneckConfig(reduction_factor=4))
    adapter = model.adapter_parameters("default")
    adapter_ids = {id(p) for p in adapter.values()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter_ids and len(adapter) == 4 * sum(POSITIONS[arch])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss = model(**sample_inputs(arch)).logits.float().square().mean()
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert not torch.equal(p, before[name]), f"adapter parameter {name} did not move"
        else:
            assert torch.equal(p, before[name]), f"base parameter {name} changed"


# ---- counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "b", "positions"),
    [
        ({"reduction_factor": 4}, 8, "both"),
        ({"bottleneck_size": 3, "reduction_factor": 4}, 3, "both"),
        ({"reduction_factor": 16, "mh_adapter": False}, 2, "ffn"),
        ({"reduction_factor": 2.5, "output_adapter": False}, 12, "mh"),
    ],
)
def test_counts_match_formula(arch: str, kwargs: dict[str, Any], b: int, positions: str) -> None:
    model = get_peft_model(build_model(arch), BottleneckConfig(**kwargs))
    n_mh, n_ffn = POSITIONS[arch]
    n = {"both": n_mh + n_ffn, "ffn": n_ffn, "mh": n_mh}[positions]
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == n * per_position(D_MODEL, b)
    assert total == sum(p.numel() for p in build_model(arch).parameters()) + trainable


def mistral_7b_on_meta() -> nn.Module:
    """Mistral-7B-v0.1's architecture with no weights (shapes only)."""
    config = transformers.MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def test_lesson_snippet_on_mistral_7b_gives_exact_count(capsys: pytest.CaptureFixture[str]) -> None:
    # the lesson's code with AutoModelWithHeads.from_pretrained replaced by a transformers
    # model wrapped in PeftModel (here Mistral-7B's shapes on the meta device)
    model = PeftModel(mistral_7b_on_meta())

    adapter_config = AdapterConfig(
        mh_adapter=True,  # adapter after multi-head attention
        output_adapter=True,  # adapter after feed-forward
        reduction_factor=64,  # d_model / reduction_factor = bottleneck size
        non_linearity="relu",
    )

    model.add_adapter("task_adapter", config=adapter_config)
    model.train_adapter("task_adapter")

    print(f"Trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    assert capsys.readouterr().out == "Trainable parameters: 33,820,672\n"
    # the lesson's formula from the model's own shapes: two adapters per layer, each a
    # d -> d / 64 down-projection and back, with biases
    config = model.base_model.config
    d, layers = config.hidden_size, config.num_hidden_layers
    assert (d, layers) == (4096, 32)
    assert len(adapter_units(model, "task_adapter")) == 2 * layers
    assert model.get_nb_trainable_parameters()[0] == 2 * layers * per_position(d, d // 64) == 33_820_672
    assert model.active_adapters == ["task_adapter"]


def test_lesson_calls_train_a_tiny_model() -> None:
    base = build_model("llama")
    inputs = sample_inputs("llama")
    expected = model_output(base, inputs)
    model = PeftModel(base)
    assert model.get_nb_trainable_parameters()[0] == 0
    assert torch.equal(model_output(model, inputs), expected)
    model.add_adapter("task_adapter", config=AdapterConfig(reduction_factor=8, non_linearity="relu"))
    # added but not active yet: still the base, nothing trainable
    assert model.get_nb_trainable_parameters()[0] == 0
    assert torch.equal(model_output(model, inputs), expected)
    model.train_adapter("task_adapter")
    assert model.training
    assert model.get_nb_trainable_parameters()[0] == 4 * per_position(D_MODEL, 4)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for p in model.adapter_parameters("task_adapter").values())


# ---- merging --------------------------------------------------------------------------------
def test_merge_raises_and_leaves_model_unchanged() -> None:
    inputs = sample_inputs("gpt2")
    model = get_peft_model(build_model("gpt2"), BottleneckConfig(reduction_factor=4))
    before = model_output(model, inputs)
    with pytest.raises(ValueError, match=r"'default' \(BOTTLENECK\) cannot be merged: .*non-linearity"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"cannot be merged: .*non-linearity"):
        model.merge_and_unload()
    assert model.merged_adapters == []
    assert len(list(wrapped_modules(model.base_model))) == 4
    assert torch.equal(model_output(model, inputs), before)


# ---- checkpoints ----------------------------------------------------------------------------
def test_save_load_round_trip(arch: str, tmp_path: Path) -> None:
    inputs = sample_inputs(arch)
    config = BottleneckConfig(reduction_factor=4, non_linearity="gelu", init_weights="houlsby")
    model = get_peft_model(build_model(arch), config)
    with torch.no_grad():
        for p in model.adapter_parameters("default").values():
            p.normal_(std=0.2)
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    params = {k.split(".")[-2] + "." + k.split(".")[-1] for k in keys}
    assert params == {"adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"}
    assert len(keys) == 4 * sum(POSITIONS[arch])
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    assert loaded.peft_config["default"].to_dict() == config.to_dict()
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=ATOL, rtol=0)


# ---- configs --------------------------------------------------------------------------------
def test_config_defaults_presets_and_json_round_trip() -> None:
    config = AdapterConfig()
    assert AdapterConfig is BottleneckConfig and config.peft_type == "BOTTLENECK"
    assert (config.mh_adapter, config.output_adapter, config.reduction_factor) == (True, True, 16)
    assert (config.bottleneck_size, config.non_linearity, config.init_weights) == (None, "relu", "bert")
    assert (HoulsbyConfig().mh_adapter, HoulsbyConfig().output_adapter) == (True, True)
    assert (PfeifferConfig().mh_adapter, PfeifferConfig().output_adapter) == (False, True)
    assert PfeifferConfig(reduction_factor=8).reduction_factor == 8
    custom = BottleneckConfig(
        bottleneck_size=7, non_linearity="GELU", mh_modules=["attn_out"], task_type="SEQ_CLS"
    )
    assert custom.non_linearity == "gelu"
    again = PeftConfig.from_dict(custom.to_dict())
    assert again == custom
    assert (
        BottleneckConfig.from_dict(PeftConfig.from_dict(HoulsbyConfig().to_dict()).to_dict())
        == HoulsbyConfig()
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"reduction_factor": -4}, "reduction_factor"),
        ({"reduction_factor": True}, "reduction_factor"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"bottleneck_size": 2.5}, "bottleneck_size"),
        ({"non_linearity": "softmax"}, "non_linearity"),
        ({"init_weights": "xavier"}, "init_weights"),
        ({"mh_adapter": False, "output_adapter": False}, "mh_adapter/output_adapter"),
        ({"mh_adapter": 1}, "mh_adapter"),
        ({"mh_adapter": False, "mh_modules": ["o"]}, "mh_modules"),
        ({"output_modules": []}, "output_modules"),
        ({"task_type": "CLASSIFY"}, "task_type"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        BottleneckConfig(**kwargs)


def test_bottleneck_too_small_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"reduction_factor: 64 leaves no bottleneck for d_model=32"):
        get_peft_model(build_model("llama"), BottleneckConfig(reduction_factor=64))


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_in = nn.Linear(8, 8)
        self.attn_out = nn.Linear(8, 8)
        self.ff_out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_out(self.attn_in(x))
        return x + self.ff_out(torch.relu(x))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TinyBlock(), TinyBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_unknown_architecture_needs_overrides() -> None:
    with pytest.raises(ValueError, match=r"no default mh_modules .*TinyNet.*attn_in, attn_out, ff_out"):
        get_peft_model(TinyNet(), BottleneckConfig())
    with pytest.raises(ValueError, match=r"no default output_modules .*attn_in, attn_out, ff_out"):
        get_peft_model(TinyNet(), PfeifferConfig())
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    net = TinyNet()
    expected = net(x)
    config = BottleneckConfig(
        bottleneck_size=2, mh_modules=["attn_out"], output_modules=r"blocks\.\d+\.ff_out"
    )
    model = get_peft_model(net, config)
    assert [n for n, _ in wrapped_modules(model.base_model)] == [
        "blocks.0.attn_out",
        "blocks.0.ff_out",
        "blocks.1.attn_out",
        "blocks.1.ff_out",
    ]
    assert differs(model(x), expected)


def test_override_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"mh_modules=\['nope'\] matches no module .*attn_out"):
        get_peft_model(TinyNet(), BottleneckConfig(mh_modules=["nope"], output_modules=["ff_out"]))
    with pytest.raises(ValueError, match=r"selected by both"):
        get_peft_model(TinyNet(), BottleneckConfig(mh_modules=["ff_out"], output_modules=["ff_out"]))
    # an override on a known architecture replaces its default
    model = get_peft_model(build_model("llama"), PfeifferConfig(output_modules=["up_proj"]))
    assert [n.rsplit(".", 1)[-1] for n, _ in wrapped_modules(model.base_model)] == ["up_proj", "up_proj"]
