"""Checkpoints: PEFT's format both ways, the key table, atomic saves, clear errors on bad files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab.core.checkpoint as ck
from conftest import build_model, model_output, sample_inputs
from peftlab import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab.core.layers import AdaptedModule, ModulesToSave

TESTS_DIR = Path(__file__).resolve().parent
ATOL = 1e-5


# ---- helpers ------------------------------------------------------------------------------
def perturb(params: list[nn.Parameter], seed: int) -> None:
    """Move adapter parameters away from their identity init, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def perturb_peftlab(model: PeftModel, name: str = "default", seed: int = 0) -> None:
    perturb(list(model.adapter_parameters(name).values()), seed)


def make_llama_lora(seed: int, r: int = 4, lora_alpha: float = 8) -> PeftModel:
    """A tiny llama with a perturbed LoRA adapter (the states the crash tests save)."""
    model = get_peft_model(
        build_model("llama"), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules="all-linear")
    )
    perturb_peftlab(model, seed=seed)
    return model


def llama_out(model: nn.Module) -> torch.Tensor:
    return model_output(model, sample_inputs("llama"))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3)


# (arch, method, config kwargs shared by PEFT and peftlab)
INTEROP = [
    ("llama", "lora", {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}),
    ("gpt2", "lora", {"task_type": "CAUSAL_LM", "r": 4, "bias": "lora_only", "fan_in_fan_out": True}),
    ("bert", "lora", {"task_type": "SEQ_CLS", "r": 4, "bias": "all"}),
    ("t5", "lora", {"task_type": "SEQ_2_SEQ_LM", "r": 4, "use_rslora": True}),
    ("llama", "ia3", {"task_type": "CAUSAL_LM"}),
    ("gpt2", "ia3", {"task_type": "CAUSAL_LM", "fan_in_fan_out": True}),
    ("bert", "ia3", {"task_type": "SEQ_CLS"}),
    ("t5", "ia3", {"task_type": "SEQ_2_SEQ_LM"}),
]
INTEROP_IDS = [f"{a}-{m}" for a, m, _ in INTEROP]


def peft_config(method: str, kwargs: dict[str, Any]) -> Any:
    import peft

    return (peft.LoraConfig if method == "lora" else peft.IA3Config)(**kwargs)


def peftlab_config(method: str, kwargs: dict[str, Any]) -> PeftConfig:
    return (LoraConfig if method == "lora" else IA3Config)(**kwargs)


def peft_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---- the boundary table -------------------------------------------------------------------
def table(model: PeftModel, name: str = "default") -> dict[str, ck.KeyEntry]:
    return {e.peft_key: e for e in ck.peft_key_table(model, name)}


def test_key_table_rows_lora_ia3_modules_to_save() -> None:
    model = get_peft_model(build_model("llama"), LoraConfig(r=4, modules_to_save=["lm_head"]))
    rows = table(model)
    q = "model.layers.0.self_attn.q_proj"
    pairs = {
        f"base_model.model.{q}.lora_A.weight": f"base_model.{q}.adapters.default.lora_A.weight",
        f"base_model.model.{q}.lora_B.weight": f"base_model.{q}.adapters.default.lora_B.weight",
        "base_model.model.lm_head.weight": "base_model.lm_head.modules_to_save.default.weight",
    }
    for peft_key, internal in pairs.items():
        assert rows[peft_key].param is model.get_parameter(internal)
        assert rows[peft_key].required
    assert rows[f"base_model.model.{q}.lora_A.weight"].module == q
    model.add_adapter("ia3", IA3Config())
    ia3_rows = table(model, "ia3")
    down = "model.layers.1.mlp.down_proj"
    assert ia3_rows[f"base_model.model.{down}.ia3_l"].param is model.get_parameter(
        f"base_model.{down}.adapters.ia3.ia3_l"
    )
    # the other adapter's layers and saved copies are not part of this adapter's table
    assert not any("lora" in k or "lm_head" in k for k in ia3_rows)


def test_key_table_rows_biases() -> None:
    gpt2 = get_peft_model(build_model("gpt2"), LoraConfig(r=4, bias="lora_only"))
    rows = table(gpt2)
    key = "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"
    assert rows[key].param is gpt2.get_parameter("base_model.transformer.h.0.attn.c_attn.base_layer.bias")

    bert = get_peft_model(build_model("bert"), LoraConfig(r=4, bias="all", task_type="SEQ_CLS"))
    rows = table(bert)
    copy_bias = bert.get_parameter("base_model.classifier.modules_to_save.default.bias")
    assert rows["base_model.model.classifier.bias"].param is copy_bias
    assert rows["base_model.model.classifier.bias"].required
    # PEFT also stores the head's biases by name under the wrapper: written, never loaded
    original = rows["base_model.model.classifier.original_module.bias"]
    assert original.param is bert.get_parameter("base_model.classifier.original_module.bias")
    alias = rows["base_model.model.classifier.modules_to_save.bias"]
    assert alias.param is copy_bias
    assert not original.required and not alias.required
    # a bias in a layer this adapter does not wrap keeps its plain name
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.bias" in rows


def test_key_table_ignores_other_adapters_wrapping() -> None:
    """A bias is named as PEFT lays it out with this adapter alone, whatever else is loaded."""
    alone = get_peft_model(build_model("gpt2"), LoraConfig(r=4, bias="lora_only", target_modules=["c_attn"]))
    keys_alone = set(table(alone))
    both = get_peft_model(build_model("gpt2"), LoraConfig(r=4, bias="lora_only", target_modules=["c_attn"]))
    both.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    assert set(table(both)) == keys_alone
    assert all(".other" not in k and ".default" not in k for k in table(both, "other"))


@pytest.mark.parametrize(("arch", "method", "kwargs"), INTEROP, ids=INTEROP_IDS)
def test_key_table_equals_peft_state_dict(arch: str, method: str, kwargs: dict[str, Any]) -> None:
    import peft
    from peft.utils import get_peft_model_state_dict

    theirs = peft.get_peft_model(build_model(arch), peft_config(method, kwargs))
    ours = get_peft_model(build_model(arch), peftlab_config(method, kwargs))
    their_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    our_shapes = {k: tuple(v.shape) for k, v in ck.adapter_state_dict(ours, "default").items()}
    assert our_shapes == their_shapes


# ---- both directions with HF PEFT ---------------------------------------------------------
@pytest.mark.parametrize(("arch", "method", "kwargs"), INTEROP, ids=INTEROP_IDS)
def test_peft_saved_loads_in_peftlab(arch: str, method: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    import peft

    inputs = sample_inputs(arch)
    base_out = model_output(build_model(arch), inputs)
    theirs = peft.get_peft_model(build_model(arch), peft_config(method, kwargs))
    perturb(peft_trainable(theirs), seed=3)
    theirs.eval()
    expected = model_output(theirs, inputs)
    assert differs(expected, base_out)
    theirs.save_pretrained(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean load: no strict=False-style warnings
        ours = PeftModel.from_pretrained(build_model(arch), tmp_path)
    assert_close(model_output(ours, inputs), expected)


@pytest.mark.parametrize(("arch", "method", "kwargs"), INTEROP, ids=INTEROP_IDS)
def test_peftlab_saved_loads_in_peft(arch: str, method: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    import peft
    from peft.utils import get_peft_model_state_dict

    inputs = sample_inputs(arch)
    base_out = model_output(build_model(arch), inputs)
    ours = get_peft_model(build_model(arch), peftlab_config(method, kwargs))
    perturb_peftlab(ours, seed=4)
    expected = model_output(ours, inputs)
    assert differs(expected, base_out)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(build_model(arch), str(tmp_path))
    theirs.eval()
    assert_close(model_output(theirs, inputs), expected)
    # PEFT found every tensor under the key it expects
    saved = load_file(tmp_path / ck.WEIGHTS_NAME)
    loaded = get_peft_model_state_dict(theirs)
    assert set(loaded) == set(saved)
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_gpt2_config_records_conv1d_layout(tmp_path: Path) -> None:
    model = get_peft_model(build_model("gpt2"), LoraConfig(r=4))
    assert model.peft_config["default"].fan_in_fan_out is False  # the user's config is untouched
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ck.CONFIG_NAME).read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("bart", IA3Config()),  # PEFT's own default for bart is q_proj, peftlab's k_proj
        ("llama", IA3Config(target_modules=["k_proj", "down_proj"])),  # no feed-forward module
        ("llama", LoraConfig(r=4, layers_to_transform=[1])),
    ],
    ids=["bart-ia3-defaults", "llama-ia3-no-ff", "llama-lora-layer1"],
)
def test_saved_config_names_the_wrapped_modules(arch: str, config: PeftConfig, tmp_path: Path) -> None:
    import peft

    inputs = sample_inputs(arch)
    ours = get_peft_model(build_model(arch), config)
    perturb_peftlab(ours, seed=10)
    expected = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / ck.CONFIG_NAME).read_text())
    assert data["target_modules"] is not None
    theirs = peft.PeftModel.from_pretrained(build_model(arch), str(tmp_path))
    theirs.eval()
    assert_close(model_output(theirs, inputs), expected)
    again = PeftModel.from_pretrained(build_model(arch), tmp_path)
    assert_close(model_output(again, inputs), expected)


def test_exact_suffixes() -> None:
    bert = build_model("bert")
    chosen = {n for n, _ in bert.named_modules() if n.endswith("output.dense")}
    assert ck.exact_suffixes(bert, chosen) == ["output.dense"]  # "dense" would take intermediate.dense too
    one = {"bert.encoder.layer.1.attention.self.query"}
    assert ck.exact_suffixes(bert, one) == ["1.attention.self.query"]
    assert ck.exact_suffixes(bert, one, layers=[1]) == ["query"]


# ---- layout, selected adapters, is_trainable ----------------------------------------------
def test_layout_and_selected_adapters(tmp_path: Path) -> None:
    model = get_peft_model(build_model("llama"), LoraConfig(r=4))
    model.add_adapter("extra", IA3Config())
    model.save_pretrained(tmp_path)
    for folder, peft_type in ((tmp_path, "LORA"), (tmp_path / "extra", "IA3")):
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]
        data = json.loads((folder / ck.CONFIG_NAME).read_text())
        assert data["peft_type"] == peft_type
        assert data["inference_mode"] is True and "base_model_name_or_path" in data
        assert "peft_version" not in data  # PEFT fills in its own
        with safe_open(str(folder / ck.WEIGHTS_NAME), "pt") as fh:
            assert fh.metadata()["format"] == "pt"

    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["extra"])
    assert not (only / ck.CONFIG_NAME).exists() and (only / "extra" / ck.CONFIG_NAME).is_file()
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(TypeError, match="unsupported"):
        model.save_pretrained(tmp_path / "x", max_shard_size="1GB")
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()


def test_round_trip_is_trainable_and_load_adapter(tmp_path: Path) -> None:
    model = get_peft_model(build_model("llama"), LoraConfig(r=4, modules_to_save=["lm_head"]))
    perturb_peftlab(model, seed=5)
    model.add_adapter("second", IA3Config())
    perturb_peftlab(model, "second", seed=6)
    out_default = llama_out(model)
    model.set_adapter("second")
    out_second = llama_out(model)
    model.save_pretrained(tmp_path)

    frozen = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    assert frozen.active_adapters == ["default"] and "default" in frozen._frozen
    assert not any(p.requires_grad for p in frozen.parameters())
    assert_close(llama_out(frozen), out_default)
    frozen.load_adapter(tmp_path / "second", adapter_name="second")
    assert frozen.active_adapters == ["default"]  # loading does not activate
    frozen.set_adapter("second")
    assert_close(llama_out(frozen), out_second)
    with pytest.raises(ValueError, match="exists already"):
        frozen.load_adapter(tmp_path / "second", adapter_name="second")

    trainable = PeftModel.from_pretrained(build_model("llama"), tmp_path, is_trainable=True)
    params = trainable.adapter_parameters("default")
    assert params and all(p.requires_grad for p in params.values())
    assert any("modules_to_save" in path for path in params)  # the lm_head copy came back too
    n_adapter = sum(p.numel() for p in params.values())
    assert trainable.get_nb_trainable_parameters()[0] == n_adapter
    assert_close(llama_out(trainable), out_default)

    via_subfolder = PeftModel.from_pretrained(
        build_model("llama"), tmp_path, subfolder="second", adapter_name="s"
    )
    assert_close(llama_out(via_subfolder), out_second)


def test_from_pretrained_with_explicit_config(tmp_path: Path) -> None:
    model = make_llama_lora(seed=1)
    model.save_pretrained(tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path, config=config)
    assert_close(llama_out(loaded), llama_out(model))
    with pytest.raises(TypeError, match="unsupported"):
        PeftModel.from_pretrained(build_model("llama"), tmp_path, device_map="auto")


# ---- model-level adapters go through the method's export/import -------------------------
@dataclass
class FakePromptConfig(PeftConfig):
    peft_type: ClassVar[str] = "FAKE_PROMPT"
    num_virtual_tokens: int = 3
    task_type: str | None = None


class FakePrompt(nn.Module):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, dim)


@pytest.fixture
def fake_prompt_method() -> Iterator[Any]:
    from peftlab.core.method import Method
    from peftlab.core.registry import register_method, unregister_method

    class FakePromptMethod(Method):
        peft_type = "FAKE_PROMPT"
        config_class = FakePromptConfig
        unmergeable_reason = "virtual tokens are not weights"

        def create_model_adapter(self, model: nn.Module, config: Any) -> nn.Module:
            return FakePrompt(config.num_virtual_tokens, 32)

        def export_model_adapter(self, module: nn.Module) -> dict[str, torch.Tensor]:
            return {"prompt_embeddings": module.embedding.weight}

        def import_model_adapter(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
            with torch.no_grad():
                module.embedding.weight.copy_(state["prompt_embeddings"])

    method = register_method(FakePromptMethod())
    yield method
    unregister_method("FAKE_PROMPT")


def test_model_level_adapter_round_trip(fake_prompt_method: Any, tmp_path: Path) -> None:
    model = get_peft_model(build_model("llama"), FakePromptConfig())
    perturb_peftlab(model, seed=7)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / ck.WEIGHTS_NAME)
    assert list(saved) == ["prompt_embeddings"]
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    assert torch.equal(loaded.model_adapters["default"].embedding.weight, saved["prompt_embeddings"])

    save_file({"prompt_embeddings": torch.zeros(5, 32)}, str(tmp_path / ck.WEIGHTS_NAME))
    with pytest.raises(ck.CheckpointError, match=r"prompt_embeddings has shape \(5, 32\).*\(3, 32\)"):
        PeftModel.from_pretrained(build_model("llama"), tmp_path)


def test_bottleneck_keys_if_available(tmp_path: Path) -> None:
    from peftlab.core.registry import get_method

    config = get_method("BOTTLENECK").config_class()
    model = get_peft_model(build_model("llama"), config)
    perturb_peftlab(model, seed=8)
    model.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / ck.WEIGHTS_NAME))
    assert keys and all(k.startswith("base_model.model.") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys} <= {"adapter_down", "adapter_up"}
    assert json.loads((tmp_path / ck.CONFIG_NAME).read_text())["peft_type"] == "BOTTLENECK"
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    assert_close(llama_out(loaded), llama_out(model))


# ---- bad files: clear errors, model unchanged ---------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A saved llama LoRA adapter and its outputs."""
    model = make_llama_lora(seed=1)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder, llama_out(model)


def load_fails(folder: Path, pattern: str, **kwargs: Any) -> ck.CheckpointError:
    with pytest.raises(ck.CheckpointError, match=pattern) as info:
        PeftModel.from_pretrained(build_model("llama"), folder, **kwargs)
    return info.value


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved: tuple[Path, torch.Tensor], damage: str) -> None:
    folder, _ = saved
    weights = folder / ck.WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00\x13junk" * 9, "empty": b""}[damage]
    )
    err = load_fails(folder, "truncated or corrupt")
    assert str(weights) in str(err) and "Re-save" in str(err)


def test_missing_or_malformed_config(saved: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, _ = saved
    config = folder / ck.CONFIG_NAME
    original = config.read_text()
    config.write_text(original[:-20])
    err = load_fails(folder, "not valid JSON")
    assert str(config) in str(err) and "line" in str(err)
    config.write_text("[1, 2]")
    load_fails(folder, "must hold a JSON object")
    config.write_text(json.dumps({**json.loads(original), "peft_type": "ROCKET"}))
    load_fails(folder, "unknown peft_type 'ROCKET'; peftlab supports .*LORA")
    config.write_text(json.dumps({**json.loads(original), "lora_magic": 3}))
    load_fails(folder, "unknown field 'lora_magic'")
    config.unlink()
    load_fails(folder, "has no adapter_config.json.*pass the folder that save_pretrained")

    # hints: adapters saved in sub-folders, and a full model folder
    nested = tmp_path / "nested"
    make_llama_lora(seed=1).save_pretrained(nested / "task_a")
    load_fails(nested, "sub-folders task_a: pass subfolder=")
    full = tmp_path / "full"
    build_model("llama").save_pretrained(full)
    load_fails(full, "full model folder")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*local folders"):
        PeftModel.from_pretrained(build_model("llama"), tmp_path / "missing")
    with pytest.raises(ck.CheckpointError, match="is a file"):
        PeftModel.from_pretrained(build_model("llama"), folder / ck.WEIGHTS_NAME)


def test_missing_weights_file(saved: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved
    (folder / ck.WEIGHTS_NAME).unlink()
    load_fails(folder, "has no adapter_model.safetensors")


def test_shape_mismatch_names_module_and_shapes(saved: tuple[Path, torch.Tensor]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, _ = saved
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ck.CheckpointError) as info:
        PeftModel.from_pretrained(wider, folder)
    msg = str(info.value)
    found = re.search(
        r"has shape (\(\d+, \d+\)) in the file but module (model\.layers\.\d\.\S+) needs (\(\d+, \d+\))", msg
    )
    assert found, msg
    file_shape, module, model_shape = found.groups()
    assert wider.get_submodule(module) is not None and file_shape != model_shape
    assert "48" in model_shape and "32" in file_shape
    assert "more weights" in msg and "different base model" in msg
    assert not any(isinstance(m, (AdaptedModule, ModulesToSave)) for m in wider.modules())
    assert all(p.requires_grad for p in wider.parameters())  # as it came in


def test_missing_and_unexpected_keys(saved: tuple[Path, torch.Tensor]) -> None:
    folder, expected = saved
    weights = folder / ck.WEIGHTS_NAME
    state = load_file(weights)
    dropped = sorted(state)[0]
    partial = {k: v for k, v in state.items() if k != dropped}
    save_file(partial, str(weights))
    err = load_fails(folder, "lacks 1 of the adapter's weights")
    assert dropped in str(err) and "strict=False" in str(err)
    with pytest.warns(UserWarning, match="strict=False"):
        PeftModel.from_pretrained(build_model("llama"), folder, strict=False)

    save_file(
        {**state, "base_model.model.model.layers.0.mlp.up_proj.lora_C.weight": torch.ones(2)}, str(weights)
    )
    load_fails(folder, "has 1 weights this adapter does not have.*lora_C")
    with pytest.warns(UserWarning, match="ignored"):
        loose = PeftModel.from_pretrained(build_model("llama"), folder, strict=False)
    assert_close(llama_out(loose), expected)


def test_targets_absent_from_model(saved: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved
    config = folder / ck.CONFIG_NAME
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["qkv_fused"]}))
    err = load_fails(folder, "does not fit this model.*qkv_fused.*candidate")
    assert str(folder) in str(err)
    # a GPT-2 adapter offered to llama
    gpt2_folder = folder.parent / "gpt2"
    get_peft_model(build_model("gpt2"), LoraConfig(r=4)).save_pretrained(gpt2_folder)
    load_fails(gpt2_folder, "c_attn.*matches no module of LlamaForCausalLM")


def test_non_finite_weights(saved: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved
    state = load_file(folder / ck.WEIGHTS_NAME)
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(folder / ck.WEIGHTS_NAME))
    load_fails(folder, f"{key} contains NaN")


class _Boom:
    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, ("echo pwned",))


def test_pickle_only_with_explicit_flag(saved: tuple[Path, torch.Tensor]) -> None:
    folder, expected = saved
    weights = folder / ck.WEIGHTS_NAME
    torch.save(load_file(weights), folder / ck.PICKLE_WEIGHTS_NAME)
    weights.unlink()
    load_fails(folder, "adapter_model.bin, a pickle file.*allow_pickle=True")
    loaded = PeftModel.from_pretrained(build_model("llama"), folder, allow_pickle=True)
    assert_close(llama_out(loaded), expected)
    torch.save({"x": _Boom()}, folder / ck.PICKLE_WEIGHTS_NAME)
    load_fails(folder, "weights-only", allow_pickle=True)


def test_failed_load_adapter_leaves_model_unchanged(saved: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, _ = saved
    model = get_peft_model(build_model("llama"), IA3Config())
    perturb_peftlab(model, seed=9)
    before_out = llama_out(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    before_modules = [n for n, _ in model.named_modules()]

    # weights for a smaller r than the config says: found only after the adapter is injected
    config = folder / ck.CONFIG_NAME
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))
    with pytest.raises(
        ck.CheckpointError, match=r"has shape \(4, \d+\) in the file but module .* needs \(8, \d+\)"
    ):
        model.load_adapter(folder, adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    assert [n for n, _ in model.named_modules()] == before_modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_grad
    after = model.state_dict()
    assert set(after) == set(before_state) and all(torch.equal(after[k], v) for k, v in before_state.items())
    assert_close(llama_out(model), before_out)


# ---- atomic saves -------------------------------------------------------------------------
def test_save_leaves_no_temp_files_and_normal_permissions(tmp_path: Path) -> None:
    model = make_llama_lora(seed=1)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / ck.WEIGHTS_NAME).stat().st_mode & 0o777 == 0o666 & ~umask


def test_saves_of_the_same_adapter_are_byte_identical(tmp_path: Path) -> None:
    """safetensors writes its metadata in a random order; peftlab sorts it, so saving the same
    adapter again (ten times here, each a fresh draw of that order) gives the same bytes."""
    model = make_llama_lora(seed=1)
    first = tmp_path / "0"
    model.save_pretrained(first)
    for i in range(1, 10):
        again = tmp_path / str(i)
        model.save_pretrained(again)
        for name in (ck.CONFIG_NAME, ck.WEIGHTS_NAME):
            assert (again / name).read_bytes() == (first / name).read_bytes(), (i, name)
    header = (first / ck.WEIGHTS_NAME).read_bytes()
    meta = json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")])["__metadata__"]
    assert list(meta) == sorted(meta) and set(meta) == {"format", ck.CONFIG_HASH_KEY}


def test_sorted_metadata_keeps_the_file_readable() -> None:
    from safetensors.torch import load, save

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    raw = save(tensors, metadata={"zz": "1", "format": "pt", "mm": "2"})
    fixed = ck.sorted_metadata(raw)
    assert len(fixed) == len(raw)
    size = int.from_bytes(fixed[:8], "little")
    assert list(json.loads(fixed[8 : 8 + size])["__metadata__"]) == ["format", "mm", "zz"]
    assert all(torch.equal(load(fixed)[k], v) for k, v in tensors.items())


def test_failed_save_keeps_previous(
    saved: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, expected = saved

    def disk_full(path: Path, state: Any, metadata: Any) -> None:
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_write_weights", disk_full)
    with pytest.raises(OSError, match="No space"):
        make_llama_lora(seed=2, r=8).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]
    assert_close(llama_out(PeftModel.from_pretrained(build_model("llama"), folder)), expected)


# A child process saves a new adapter (different r and alpha, so a mixed pair of files could
# never pass as either save) into a folder holding an older one, and pauses at a chosen point
# of save_pretrained; the parent kills it with SIGKILL there.
CHILD = """
import sys, time
sys.path.insert(0, sys.argv[3])
import peftlab.core.checkpoint as ck
from peftlab.core import atomic
from test_checkpoint import NEW, make_llama_lora

stage, folder = sys.argv[1], sys.argv[2]
def pause():
    print("PAUSED", flush=True)
    time.sleep(600)

if stage == "writing":  # killed while the weights' temporary file is half written
    write = ck._write_weights
    def half(path, state, metadata):
        write(path, state, metadata)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        pause()
    ck._write_weights = half
elif stage == "before_commit":  # both files staged, neither renamed
    atomic.commit = lambda tmp, final: pause()
elif stage == "between_commits":  # weights renamed into place, config not yet
    commit, done = atomic.commit, []
    def once(tmp, final):
        if done:
            pause()
        done.append(final)
        commit(tmp, final)
    atomic.commit = once

states = [make_llama_lora(**NEW), make_llama_lora(seed=1)]
if stage == "loop":  # save two different adapters in turn until killed
    print("PAUSED", flush=True)
    i = 0
    while True:
        states[i % 2].save_pretrained(folder)
        i += 1
states[0].save_pretrained(folder)
print("FINISHED", flush=True)
"""
NEW: dict[str, Any] = {"seed": 2, "r": 8, "lora_alpha": 32}


def kill_save_at(stage: str, folder: Path, delay: float = 0.0) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, stage, str(folder), str(TESTS_DIR)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "PAUSED", (
            f"child did not reach {stage}: {line}{proc.stderr.read() if proc.stderr else ''}"
        )
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["writing", "before_commit"])
def test_sigkill_mid_save_keeps_previous(saved: tuple[Path, torch.Tensor], stage: str) -> None:
    import peft

    folder, expected = saved
    kill_save_at(stage, folder)
    assert any(p.name.endswith(".tmp") for p in folder.iterdir())  # the save really was cut short
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(llama_out(PeftModel.from_pretrained(build_model("llama"), folder)), expected)
    theirs = peft.PeftModel.from_pretrained(build_model("llama"), str(folder))
    assert_close(llama_out(theirs), expected)
    # the next save sweeps the leftovers away
    make_llama_lora(**NEW).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]


def test_sigkill_between_renames_recovers_new_save(saved: tuple[Path, torch.Tensor]) -> None:
    folder, old = saved
    new = llama_out(make_llama_lora(**NEW))
    kill_save_at("between_commits", folder)
    # new weights with the old config on disk: the config staged beside them completes the pair
    assert json.loads((folder / ck.CONFIG_NAME).read_text())["r"] == 4
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = PeftModel.from_pretrained(build_model("llama"), folder)
    assert_close(llama_out(loaded), new)
    assert differs(new, old)
    # the load repaired the folder, so PEFT reads it too
    assert sorted(p.name for p in folder.iterdir()) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]
    assert json.loads((folder / ck.CONFIG_NAME).read_text())["r"] == 8


# kill times spread over the loop (each save takes a few milliseconds, so each lands at some point
# of some save); fixed, so a failing time is named in the test id and can be run again
@pytest.mark.parametrize("delay", [0.35, 0.75])
def test_sigkill_at_random_time_in_save_loop(saved: tuple[Path, torch.Tensor], delay: float) -> None:
    folder, old = saved
    new = llama_out(make_llama_lora(**NEW))
    kill_save_at("loop", folder, delay=delay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an interrupted rename may be completed here
        out = llama_out(PeftModel.from_pretrained(build_model("llama"), folder))
    assert (out - old).abs().max() < ATOL or (out - new).abs().max() < ATOL


def test_hand_edited_config_is_taken_as_is(saved: tuple[Path, torch.Tensor]) -> None:
    folder, expected = saved
    config = folder / ck.CONFIG_NAME
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 16}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = llama_out(PeftModel.from_pretrained(build_model("llama"), folder))
    assert differs(out, expected)  # doubled scaling, as the edit asks
