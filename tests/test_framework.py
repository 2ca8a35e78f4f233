"""The shared suite: every module-level method × every architecture, plus injection and the model API.

The table (``CASES``) runs LoRA on all linear layers and IA3 with the architecture defaults over
llama (GQA), gpt2 (Conv1D), bert (SEQ_CLS head in modules_to_save), t5 and bart.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from conftest import build_model, model_output, sample_inputs
from peftlab import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftlab.core.injection import linear_module_names, wrapped_modules
from peftlab.core.layers import AdaptedModule
from suite_helpers import (
    CASE_IDS,
    CASES,
    METHODS,
    assert_close,
    assert_equal,
    differs,
    loss_of,
    module_classes,
    sub,
    weights,
    wrappers_left,
)

table = pytest.mark.parametrize(("method", "arch"), CASES, ids=CASE_IDS)


def adapted(method: str, arch: str, init: bool = False) -> tuple[PeftModel, torch.Tensor]:
    """(model with one adapter, the base model's output on ``sample_inputs(arch)``)."""
    base = build_model(arch)
    base_out = model_output(base, sample_inputs(arch))
    return get_peft_model(base, METHODS[method](arch, init)), base_out


# ---- the method × architecture table ---------------------------------------------------------
@table
def test_default_init_equals_base_exactly(method: str, arch: str) -> None:
    model, base_out = adapted(method, arch, init=True)
    assert len(list(wrapped_modules(model.base_model))) > 0
    assert_equal(model_output(model, sample_inputs(arch)), base_out)


@table
def test_nontrivial_init_changes_output(method: str, arch: str) -> None:
    model, base_out = adapted(method, arch, init=False)
    assert differs(model_output(model, sample_inputs(arch)), base_out)


@table
def test_merge_equals_unmerged_and_unmerge_restores(method: str, arch: str) -> None:
    model, _ = adapted(method, arch)
    inputs = sample_inputs(arch)
    before = weights(model.base_model)
    unmerged = model_output(model, inputs)

    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    changed = [k for k in before if not torch.equal(before[k], model.base_model.state_dict()[k])]
    assert changed, "merging changed no base weight"
    assert_close(model_output(model, inputs), unmerged)

    model.unmerge_adapter()
    assert model.merged_adapters == []
    after = model.base_model.state_dict()
    for k, w in before.items():
        assert_close(after[k], w, atol=1e-6)
    assert_close(model_output(model, inputs), unmerged)


@table
def test_merge_and_unload_returns_plain_model(method: str, arch: str) -> None:
    model, _ = adapted(method, arch)
    inputs = sample_inputs(arch)
    expected = model_output(model, inputs)
    plain = model.merge_and_unload()
    assert not isinstance(plain, PeftModel)
    assert wrappers_left(plain) == []
    assert module_classes(plain) == module_classes(build_model(arch))
    assert_close(model_output(plain, inputs), expected)


@table
def test_unload_restores_base_exactly(method: str, arch: str) -> None:
    model, base_out = adapted(method, arch)
    model.merge_adapter()  # unload must undo a merge too
    plain = model.unload()
    assert wrappers_left(plain) == []
    assert module_classes(plain) == module_classes(build_model(arch))
    # unmerging subtracts what merging added: exact up to fp32 rounding
    assert_close(model_output(plain, sample_inputs(arch)), base_out)


@table
def test_unload_unmerged_is_bit_exact(method: str, arch: str) -> None:
    model, base_out = adapted(method, arch)
    assert_equal(model_output(model.unload(), sample_inputs(arch)), base_out)


@table
def test_disable_adapter_equals_base(method: str, arch: str) -> None:
    model, base_out = adapted(method, arch)
    inputs = sample_inputs(arch)
    adapted_out = model_output(model, inputs)
    with model.disable_adapter():
        assert_equal(model_output(model, inputs), base_out)
    assert_equal(model_output(model, inputs), adapted_out)

    model.merge_adapter()
    with model.disable_adapter():
        # merged weights are unmerged for the block: exact up to the subtraction's rounding
        assert_close(model_output(model, inputs), base_out)
    assert model.merged_adapters == ["default"]
    assert_close(model_output(model, inputs), adapted_out)


@table
def test_optimizer_step_changes_only_adapter(method: str, arch: str) -> None:
    model, _ = adapted(method, arch)
    declared = model.adapter_parameters("default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(declared)

    before = weights(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all of them: frozen ones must be skipped
    loss_of(model(**sample_inputs(arch))).backward()
    opt.step()

    for name, p in params.items():
        if name in declared:
            assert not torch.equal(p, before[name]), f"adapter parameter {name} did not train"
        else:
            assert_equal(p, before[name])
    for name, buf in model.named_buffers():
        assert_equal(buf, buffers[name])


# ---- several adapters, both methods --------------------------------------------------------
def two_adapters() -> tuple[PeftModel, torch.Tensor]:
    base = build_model("llama")
    base_out = model_output(base, sample_inputs("llama"))
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.add_adapter("scale", IA3Config(init_ia3_weights=False))  # k, v, down_proj
    return model, base_out


def test_multiple_adapters_switch_and_combine() -> None:
    model, base_out = two_adapters()
    inputs = sample_inputs("llama")
    assert model.active_adapters == ["default"]
    lora_out = model_output(model, inputs)

    model.set_adapter("scale")
    assert model.active_adapters == ["scale"]
    ia3_out = model_output(model, inputs)

    model.set_adapter(["default", "scale"])
    assert model.active_adapters == ["default", "scale"]
    both = model_output(model, inputs)
    for out in (lora_out, ia3_out):
        assert differs(both, out) and differs(out, base_out)

    # v_proj carries both; merging both must match running them unmerged
    model.merge_adapter()
    assert sorted(model.merged_adapters) == ["default", "scale"]
    assert_close(model_output(model, inputs), both)
    model.set_adapter("default")  # leaving a merged adapter unmerges
    assert model.merged_adapters == []
    assert_close(model_output(model, inputs), lora_out)


def test_only_active_adapters_are_trainable() -> None:
    model, _ = two_adapters()
    lora = set(model.adapter_parameters("default"))
    ia3 = set(model.adapter_parameters("scale"))
    assert lora and ia3 and not lora & ia3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora

    model.train_adapter("scale")
    assert model.active_adapters == ["scale"]
    assert model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ia3


def test_delete_adapter_frees_params_and_unwraps() -> None:
    model, _ = two_adapters()
    inputs = sample_inputs("llama")
    model.set_adapter("scale")
    ia3_out = model_output(model, inputs)
    model.set_adapter(["default", "scale"])
    n_before = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for p in model.adapter_parameters("default").values())

    model.delete_adapter("default")
    assert list(model.peft_config) == ["scale"]
    assert model.active_adapters == ["scale"]
    assert sum(p.numel() for p in model.parameters()) == n_before - n_lora
    layer = sub(model.base_model, "model.layers.0.self_attn")
    assert type(layer.q_proj) is nn.Linear  # held only LoRA: unwrapped
    assert isinstance(layer.v_proj, AdaptedModule)  # still holds IA3
    assert list(layer.v_proj.adapters) == ["scale"]
    assert_close(model_output(model, inputs), ia3_out)
    with pytest.raises(ValueError, match="no adapter named 'default'"):
        model.set_adapter("default")

    model.delete_adapter("scale")
    assert wrappers_left(model.base_model) == []


def test_delete_merged_adapter_restores_weights() -> None:
    model, base_out = two_adapters()
    model.merge_adapter()
    model.delete_adapter("default")
    model.set_adapter("scale")
    model.delete_adapter("scale")
    assert_close(model_output(model, sample_inputs("llama")), base_out)


@pytest.mark.parametrize("name", ["", "a.b", "__base__", 3])
def test_adapter_names_validated(name: object) -> None:
    model, _ = two_adapters()
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, LoraConfig(r=2))  # type: ignore[arg-type]


def test_duplicate_adapter_name_rejected() -> None:
    model, _ = two_adapters()
    with pytest.raises(ValueError, match="'scale' exists already"):
        model.add_adapter("scale", LoraConfig(r=2))
    with pytest.raises(ValueError, match="repeat"):
        model.set_adapter(["scale", "scale"])
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig(r=2))


def test_attribute_pass_through() -> None:
    base = build_model("llama")
    model = get_peft_model(base, LoraConfig(r=2))
    assert model.config is base.config
    assert model.get_input_embeddings() is base.get_input_embeddings()  # type: ignore[operator]
    assert model.get_base_model() is base


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_generate_passes_through(arch: str) -> None:
    base: Any = build_model(arch)
    inputs: dict[str, Any] = {k: v for k, v in sample_inputs(arch).items() if k != "decoder_input_ids"}
    kw: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    base_tokens = base.generate(**inputs, **kw)
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False))
    tokens = model.generate(**inputs, **kw)
    assert tokens.shape == base_tokens.shape
    with model.disable_adapter():
        assert torch.equal(model.generate(**inputs, **kw), base_tokens)

    # the first generated token is the adapted model's greedy choice
    if arch == "t5":
        start = torch.zeros_like(inputs["input_ids"][:, :1])
        logits = model_output(model, {**inputs, "decoder_input_ids": start})
        first = tokens[:, 1]
    else:
        logits = model_output(model, inputs)
        first = tokens[:, inputs["input_ids"].shape[1]]
    assert torch.equal(first, logits[:, -1].argmax(-1))


# ---- injection -----------------------------------------------------------------------------
class Toy(nn.Module):
    """An architecture peftlab has no defaults for, with deliberately overlapping names."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict(
            {"q_proj": nn.Linear(8, 8), "kv_proj": nn.Linear(8, 8), "proj": nn.Linear(8, 8)}
        )
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        return self.out(self.norm(a["proj"](a["q_proj"](x) + a["kv_proj"](x))))


def wrapped_names(model: PeftModel) -> set[str]:
    return {n for n, _ in wrapped_modules(model.base_model)}


def test_suffix_matching_is_whole_component() -> None:
    assert wrapped_names(get_peft_model(Toy(), LoraConfig(r=2, target_modules=["proj"]))) == {"attn.proj"}
    assert wrapped_names(get_peft_model(Toy(), LoraConfig(r=2, target_modules=["attn.proj"]))) == {
        "attn.proj"
    }
    # "v_proj" is not a suffix of "kv_proj" at a component boundary
    with pytest.raises(ValueError, match="v_proj"):
        get_peft_model(Toy(), LoraConfig(r=2, target_modules=["v_proj"]))


def test_any_torch_module_works() -> None:
    toy = Toy()
    x = torch.randn(3, 8)
    base_out = toy(x).detach()
    model = get_peft_model(toy, LoraConfig(r=2, target_modules=["q_proj", "out"], init_lora_weights=False))
    out = model(x)
    assert differs(out, base_out)
    assert_close(model.merge_and_unload()(x), out)


def test_regex_target() -> None:
    pattern = r"model\.layers\.0\.self_attn\.(q|v)_proj"
    model = get_peft_model(build_model("llama"), LoraConfig(r=2, target_modules=pattern))
    assert wrapped_names(model) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    # the regex must match the whole name, not a part of it
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(build_model("llama"), LoraConfig(r=2, target_modules=r"q_proj"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_all_linear_excludes_output_head(arch: str) -> None:
    base = build_model(arch)
    everything = set(linear_module_names(base))
    model = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear"))
    assert "lm_head" in everything
    assert wrapped_names(model) == everything - {"lm_head"}


def test_unknown_target_lists_candidates() -> None:
    for targets in (["nope"], ["q_proj", "nope"]):
        with pytest.raises(ValueError, match=r"nope.*candidate.*down_proj.*q_proj.*v_proj"):
            get_peft_model(build_model("llama"), LoraConfig(r=2, target_modules=targets))
    with pytest.raises(ValueError, match=r"modules_to_save.*nope.*candidate"):
        get_peft_model(build_model("llama"), LoraConfig(r=2, modules_to_save=["nope"]))


@pytest.mark.parametrize("config", [LoraConfig(r=2), IA3Config()], ids=["lora", "ia3"])
def test_unknown_architecture_needs_targets(config: LoraConfig | IA3Config) -> None:
    with pytest.raises(ValueError, match=r"no default target_modules.*Toy.*kv_proj, out, proj, q_proj"):
        get_peft_model(Toy(), config)


@pytest.mark.parametrize(
    ("config", "target"),
    [
        (LoraConfig(r=2, target_modules=["input_layernorm"]), "input_layernorm"),
        (LoraConfig(r=2, target_modules=["embed_tokens"]), "embed_tokens"),
        (IA3Config(target_modules=["post_attention_layernorm"]), "post_attention_layernorm"),
    ],
    ids=["lora-norm", "lora-embedding", "ia3-norm"],
)
def test_non_linear_target_is_clear_error(config: LoraConfig | IA3Config, target: str) -> None:
    base = build_model("llama")
    with pytest.raises(ValueError, match=rf"{target}.*not a linear layer"):
        get_peft_model(base, config)


def test_failed_get_peft_model_leaves_model_unchanged() -> None:
    base = build_model("llama")
    classes, before = module_classes(base), weights(base)
    # q_proj comes before input_layernorm in each layer, so some wrapping happens before the error
    bad = LoraConfig(r=2, target_modules=["q_proj", "input_layernorm"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="not a linear layer"):
        get_peft_model(base, bad)
    assert wrappers_left(base) == []
    assert module_classes(base) == classes
    for k, w in base.state_dict().items():
        assert_equal(w, before[k])
    assert all(p.requires_grad for p in base.parameters())


def test_failed_add_adapter_leaves_model_unchanged() -> None:
    model, _ = two_adapters()
    inputs = sample_inputs("llama")
    out = model_output(model, inputs)
    classes = module_classes(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bad = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "input_layernorm"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=re.escape("input_layernorm")):
        model.add_adapter("bad", bad)
    assert module_classes(model) == classes
    assert list(model.peft_config) == ["default", "scale"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not any(".bad." in n for n, _ in model.named_parameters())
    assert_equal(model_output(model, inputs), out)


def test_peft_style_modules_to_save_with_absent_head_is_accepted() -> None:
    """PEFT writes ["classifier", "score"] for SEQ_CLS; a bert has only the first."""
    from conftest import build_model
    from peftlab import LoraConfig, get_peft_model

    model = get_peft_model(build_model("bert"), LoraConfig(modules_to_save=["classifier", "score"]))
    assert any(".modules_to_save.default." in n for n in model.adapter_parameters("default"))
    with pytest.raises(ValueError, match="nonexist"):
        get_peft_model(build_model("bert"), LoraConfig(modules_to_save=["nonexist"]))
