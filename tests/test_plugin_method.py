"""A fifth method, defined and registered from this file alone: a learned scalar that scales a
module's output. Everything the framework offers works for it without touching peftlab:
add, forward, merge, save, load, per-sample mixed batches and weighted combination."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import build_model, model_output, sample_inputs
from peftlab import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab.core.config import TaskType, normalize_targets
from peftlab.core.layers import AdapterUnit, base_bias, base_weight
from peftlab.core.method import Method, architecture_of, resolve_targets
from peftlab.core.registry import get_method, register_method, unregister_method

TOL = 1e-5


@dataclass
class ScaleConfig(PeftConfig):
    peft_type: ClassVar[str] = "SCALE"

    target_modules: list[str] | str | None = None
    task_type: TaskType | str | None = None

    def validate(self) -> None:
        self.target_modules = normalize_targets("target_modules", self.target_modules)


class ScaleUnit(AdapterUnit):
    """``y <- s * y`` with one learned scalar ``s`` per module."""

    stage = "post"
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=base_weight(base_layer).dtype))

    def post(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale

    def merged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = base_bias(base_layer)
        return base_weight(base_layer) * self.scale, None if bias is None else bias * self.scale

    def unmerged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = base_bias(base_layer)
        return base_weight(base_layer) / self.scale, None if bias is None else bias / self.scale


class ScaleMethod(Method):
    peft_type = "SCALE"
    config_class = ScaleConfig
    name = "scale"
    mergeable = True

    def targets(self, model: nn.Module, config: Any) -> dict[str, Any]:
        default = {"llama": ["o_proj"]}.get(architecture_of(model) or "")
        return dict.fromkeys(resolve_targets(model, config.target_modules, default, method="scale"))

    def make_unit(self, base_layer: nn.Module, config: Any, role: Any) -> AdapterUnit:
        return ScaleUnit(base_layer)


@pytest.fixture
def scale_method() -> Iterator[Method]:
    method = register_method(ScaleMethod())  # the one registry line a method needs
    yield method
    unregister_method("SCALE")


def set_scales(model: PeftModel, adapter: str, seed: int) -> None:
    """Scales well away from 1 (the identity), so no output equals the base by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(adapter).values():
            p.fill_(float(1.5 + torch.rand((), generator=g)))


def scaled(seed: int = 1, name: str = "default") -> PeftModel:
    model = get_peft_model(build_model("llama"), ScaleConfig(), adapter_name=name)
    set_scales(model, name, seed)
    return model


@pytest.mark.usefixtures("scale_method")
def test_add_and_forward_scale_the_targets() -> None:
    inputs = sample_inputs("llama")
    base_out = model_output(build_model("llama"), inputs)
    model = get_peft_model(build_model("llama"), ScaleConfig())
    assert torch.allclose(model_output(model, inputs), base_out, atol=TOL)  # scale 1: the identity
    set_scales(model, "default", 1)
    assert (model_output(model, inputs) - base_out).abs().max() > 1e-2
    params = model.adapter_parameters("default")
    assert len(params) == 2 and all(p.requires_grad and p.numel() == 1 for p in params.values())
    assert model.get_nb_trainable_parameters()[0] == 2  # one scalar per layer's o_proj
    with model.disable_adapter():
        assert torch.allclose(model_output(model, inputs), base_out, atol=TOL)


@pytest.mark.usefixtures("scale_method")
def test_merge_and_unmerge() -> None:
    inputs = sample_inputs("llama")
    model = scaled()
    expected = model_output(model, inputs)
    model.merge_adapter()
    assert torch.allclose(model_output(model, inputs), expected, atol=TOL)
    model.unmerge_adapter()
    assert torch.allclose(model_output(model, inputs), expected, atol=TOL)
    plain = model.merge_and_unload()
    assert not isinstance(plain, PeftModel)
    assert torch.allclose(model_output(plain, inputs), expected, atol=TOL)


@pytest.mark.usefixtures("scale_method")
def test_save_and_load(tmp_path: Path) -> None:
    inputs = sample_inputs("llama")
    model = scaled()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SCALE" and config["target_modules"] == ["o_proj"]
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == [f"base_model.model.model.layers.{i}.self_attn.o_proj.scale" for i in range(2)]
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    assert isinstance(loaded.peft_config["default"], ScaleConfig)
    assert torch.allclose(model_output(loaded, inputs), model_output(model, inputs), atol=TOL)
    assert isinstance(PeftConfig.from_dict(config), ScaleConfig)


@pytest.mark.usefixtures("scale_method")
def test_mixed_batch_with_lora_equals_each_sample_alone() -> None:
    inputs = sample_inputs("llama", batch=3)
    model = scaled(name="s")
    model.add_adapter("l", LoraConfig(r=2, init_lora_weights=False))
    out = model_output_routed(model, inputs, ["s", "__base__", "l"])
    for row, name in enumerate(["s", "__base__", "l"]):
        alone = {k: v[row : row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected = model_output(model, alone)
        else:
            model.set_adapter(name)
            expected = model_output(model, alone)
        assert torch.allclose(out[row : row + 1], expected, atol=TOL), name


def model_output_routed(model: PeftModel, inputs: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, adapter_names=names).logits


@pytest.mark.usefixtures("scale_method")
def test_weighted_combination() -> None:
    model = scaled(seed=1, name="a")
    model.add_adapter("b", ScaleConfig())
    set_scales(model, "b", 2)
    model.add_weighted_adapter(["a", "b"], [0.25, 0.75], adapter_name="ab")
    for path, p in model.adapter_parameters("ab").items():
        a = model.get_parameter(path.replace(".ab.", ".a."))
        b = model.get_parameter(path.replace(".ab.", ".b."))
        assert torch.allclose(p, 0.25 * a + 0.75 * b, atol=1e-6)
    assert get_method("SCALE").combination_types == ("linear",)
    with pytest.raises(ValueError, match="'cat' is not available for SCALE adapters"):
        model.add_weighted_adapter(["a", "b"], [1, 1], adapter_name="c", combination_type="cat")


def test_unregistered_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown peft_type 'SCALE'"):
        PeftConfig.from_dict({"peft_type": "SCALE"})
