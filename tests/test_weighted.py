"""``add_weighted_adapter``: every combination against its hand-computed result.

Adapters are initialised away from identity (LoRA B != 0, IA3 != 1, bottleneck up != 0,
random prefixes), so a combination that dropped an input could not pass by accident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

from conftest import build_model, model_output, sample_inputs
from peftlab import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
)
from peftlab.core.injection import wrapped_modules
from peftlab.core.layers import is_conv1d
from peftlab.methods.bottleneck import BottleneckUnit
from peftlab.methods.ia3 import IA3Unit
from peftlab.methods.lora import LoraUnit
from peftlab.methods.prefix import PrefixEncoder
from suite_helpers import assert_close, differs, peft_name, perturb

# LoRA inputs per architecture: a (r=4) and b (r=2, rsLoRA) overlap on one target each and
# each has a target of its own; c has a's rank (for "linear") and another scaling
LORA_TARGETS = {
    "llama": {"a": ["q_proj", "v_proj"], "b": ["v_proj", "o_proj"], "c": ["v_proj", "up_proj"]},
    "gpt2": {"a": ["c_attn"], "b": ["c_attn", "c_proj"], "c": ["c_fc", "c_attn"]},
}
LORA_SHAPES = {"a": {"r": 4, "lora_alpha": 8}, "b": {"r": 2, "lora_alpha": 4, "use_rslora": True}}
LORA_SHAPES["c"] = {"r": 4, "lora_alpha": 2}
W = {"a": 0.7, "b": -0.4, "c": 0.5}


def lora_configs(arch: str) -> dict[str, LoraConfig]:
    return {
        name: LoraConfig(target_modules=LORA_TARGETS[arch][name], init_lora_weights=False, **shape)  # type: ignore[arg-type]
        for name, shape in LORA_SHAPES.items()
    }


def lora_model(arch: str) -> PeftModel:
    model = PeftModel(build_model(arch))
    for name, config in lora_configs(arch).items():
        model.add_adapter(name, config)
    model.set_adapter("a")
    return model


def units(model: PeftModel, name: str) -> dict[str, Any]:
    """Module path (in the base model) -> this adapter's unit."""
    return {m: w.adapters[name] for m, w in wrapped_modules(model.base_model) if name in w.adapters}


def exact_delta(model: PeftModel, module: str, names: list[str]) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i at one module, (out, in) layout; inputs not there add zero."""
    wrapper = model.base_model.get_submodule(module)
    total: torch.Tensor | None = None
    for name in names:
        if name in wrapper.adapters:
            term = W[name] * wrapper.adapters[name].delta_weight().detach().double()
            total = term if total is None else total + term
    assert total is not None
    return total


def best_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def base_with_deltas(arch: str, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """The base model with ``deltas`` ((out, in) layout) added to its weights."""
    model = build_model(arch)
    with torch.no_grad():
        for module_name, delta in deltas.items():
            layer = model.get_submodule(module_name)
            layer.weight.add_((delta.T if is_conv1d(layer) else delta).to(layer.weight.dtype))
    return model


def check_lora_result(model: PeftModel, arch: str, name: str, deltas: dict[str, torch.Tensor]) -> None:
    """The new adapter: inactive, frozen, scaling 1, on exactly the expected modules, with
    ``deltas``, and its model output equals the base model with those deltas added."""
    assert name not in model.active_adapters
    assert not any(p.requires_grad for p in model.adapter_parameters(name).values())
    got = units(model, name)
    assert set(got) == set(deltas)
    for module, unit in got.items():
        assert isinstance(unit, LoraUnit) and unit.scaling == 1.0
        assert_close(unit.delta_weight().double(), deltas[module])
    inputs = sample_inputs(arch)
    model.set_adapter(name)
    out = model_output(model, inputs)
    assert differs(out, model_output(build_model(arch), inputs))
    assert_close(out, model_output(base_with_deltas(arch, deltas), inputs))


# ---- LoRA --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_cat_is_the_exact_weighted_sum(arch: str) -> None:
    model = lora_model(arch)
    model.add_weighted_adapter(["a", "b"], [W["a"], W["b"]], "ab", combination_type="cat")
    config = model.peft_config["ab"]
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.use_rslora) == (6, 6, False)
    modules = set(units(model, "a")) | set(units(model, "b"))
    assert set(units(model, "a")) != modules  # b really adds modules of its own
    deltas = {m: exact_delta(model, m, ["a", "b"]) for m in modules}
    check_lora_result(model, arch, "ab", deltas)
    # the parameters themselves: A's scaled by w_i s_i stacked along the rank, zero padded
    for module, unit in units(model, "ab").items():
        parts = [(units(model, n).get(module), W[n]) for n in ("a", "b")]
        a = torch.cat([u.lora_A.weight * (w * u.scaling) for u, w in parts if u is not None])
        assert_close(unit.lora_A.weight[: a.shape[0]], a)
        assert not unit.lora_A.weight[a.shape[0] :].any()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_svd_full_rank_equals_cat_and_low_rank_is_the_best_approximation(arch: str) -> None:
    model = lora_model(arch)
    model.add_weighted_adapter(["a", "b"], [W["a"], W["b"]], "full", combination_type="svd", svd_rank=6)
    model.add_weighted_adapter(["a", "b"], [W["a"], W["b"]], "k2", combination_type="svd", svd_rank=2)
    model.add_weighted_adapter(["a", "b"], [W["a"], W["b"]], "default", combination_type="svd")
    assert [model.peft_config[n].r for n in ("full", "k2", "default")] == [6, 2, 4]  # type: ignore[attr-defined]
    exact = {m: exact_delta(model, m, ["a", "b"]) for m in units(model, "full")}
    for module, unit in units(model, "full").items():
        assert_close(unit.delta_weight().double(), exact[module], atol=1e-4)
    check_lora_result(model, arch, "k2", {m: best_rank(d, 2) for m, d in exact.items()})
    truncated = [m for m, d in exact.items() if torch.linalg.svdvals(d)[2] > 0.1]
    assert truncated  # modules where rank 2 really cuts something off
    for module in truncated:
        assert differs(units(model, "k2")[module].delta_weight().double(), exact[module])


def test_lora_svd_rank_beyond_a_modules_size_pads_with_zeros() -> None:
    model = lora_model("llama")
    # v_proj is 32 -> 16 (grouped-query attention): at most 16 singular values there
    model.add_weighted_adapter(["a", "b"], [W["a"], W["b"]], "wide", combination_type="svd", svd_rank=20)
    for module, unit in units(model, "wide").items():
        assert unit.lora_A.weight.shape[0] == 20
        assert_close(unit.delta_weight().double(), exact_delta(model, module, ["a", "b"]), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_linear_combines_a_and_b_separately_as_peft_does(arch: str) -> None:
    model = lora_model(arch)
    model.add_weighted_adapter(["a", "c"], [W["a"], -W["c"]], "ac", combination_type="linear")
    config = model.peft_config["ac"]
    assert isinstance(config, LoraConfig) and (config.r, config.lora_alpha) == (4, 4)
    deltas = {}
    for module in set(units(model, "a")) | set(units(model, "c")):
        a = b = torch.zeros((), dtype=torch.float64)
        for name, w in (("a", W["a"]), ("c", -W["c"])):
            unit = units(model, name).get(module)
            if unit is not None:
                root = (abs(w) * unit.scaling) ** 0.5
                a = a + (root if w > 0 else -root) * unit.lora_A.weight.double()
                b = b + root * unit.lora_B.weight.double()
        new = units(model, "ac")[module]
        assert_close(new.lora_A.weight.double(), a)
        assert_close(new.lora_B.weight.double(), b)
        deltas[module] = (b @ a).detach()
    check_lora_result(model, arch, "ac", deltas)


def test_lora_linear_of_one_adapter_scales_its_delta() -> None:
    model = lora_model("llama")
    model.add_weighted_adapter(["b"], [-0.5], "scaled", combination_type="linear")
    scaled = units(model, "scaled")
    # b's targets (v_proj and o_proj) in each of the 2 layers, and only those
    assert len(scaled) == 2 * 2 and set(scaled) == set(units(model, "b"))
    for module, unit in scaled.items():
        expected = -0.5 * units(model, "b")[module].delta_weight()
        assert expected.abs().max() > 1e-3  # b's delta is not zero (B != 0)
        assert_close(unit.delta_weight(), expected)


# ---- IA3, bottleneck, prefix ---------------------------------------------------------------
def weighted_sum(model: PeftModel, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i p_i per parameter, keyed by the parameter's path with the adapter name cut out."""
    total: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights, strict=True):
        for path, p in model.adapter_parameters(name).items():
            key = path.replace(f".{name}.", ".<new>.")
            total[key] = total.get(key, 0) + w * p.detach()
    return total


def check_params_and_output(
    model: PeftModel, arch: str, name: str, expected: dict[str, torch.Tensor]
) -> None:
    """The new adapter's parameters are ``expected``, and a fresh model with one adapter of the
    new config holding ``expected`` gives the same outputs (so the config is right too)."""
    got = {path.replace(f".{name}.", ".<new>."): p for path, p in model.adapter_parameters(name).items()}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert_close(got[key], value)
    fresh = PeftModel(build_model(arch), model.peft_config[name], adapter_name="fresh")
    with torch.no_grad():
        for path, p in fresh.adapter_parameters("fresh").items():
            p.copy_(expected[path.replace(".fresh.", ".<new>.")])
    inputs = sample_inputs(arch)
    model.set_adapter(name)
    out = model_output(model, inputs)
    assert differs(out, model_output(build_model(arch), inputs))
    assert_close(out, model_output(fresh, inputs))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_weighted_vectors(arch: str) -> None:
    model = PeftModel(build_model(arch))
    for name in ("x", "y"):
        model.add_adapter(name, IA3Config(init_ia3_weights=False))
    model.add_weighted_adapter(["x", "y"], [0.6, 0.5], "xy")
    roles = {m: u.is_feedforward for m, u in units(model, "xy").items()}
    assert roles == {m: u.is_feedforward for m, u in units(model, "x").items()}
    assert any(roles.values()) and not all(roles.values())
    assert all(isinstance(u, IA3Unit) for u in units(model, "xy").values())
    check_params_and_output(model, arch, "xy", weighted_sum(model, ["x", "y"], [0.6, 0.5]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bottleneck_weighted_average(arch: str) -> None:
    model = PeftModel(build_model(arch))
    for seed, name in enumerate(("x", "y")):
        model.add_adapter(name, BottleneckConfig(reduction_factor=4, non_linearity="gelu"))
        perturb(model.adapter_parameters(name).values(), seed=seed, scale=0.3)  # biases too
    model.add_weighted_adapter(["x", "y"], [0.25, 0.75], "xy")
    assert all(isinstance(u, BottleneckUnit) for u in units(model, "xy").values())
    check_params_and_output(model, arch, "xy", weighted_sum(model, ["x", "y"], [0.25, 0.75]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_weighted_average_folds_a_projection(arch: str) -> None:
    model = PeftModel(build_model(arch))
    model.add_adapter(
        "x", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True)
    )
    model.add_adapter("y", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    perturb(model.adapter_parameters("x").values(), seed=1, scale=0.3)
    model.add_weighted_adapter(["x", "y"], [0.7, 0.3], "xy")
    assert model.peft_config["xy"].prefix_projection is False  # type: ignore[attr-defined]
    vectors = {}
    for name in ("x", "y"):
        encoder = model.model_adapters[name]
        assert isinstance(encoder, PrefixEncoder)
        vectors[name] = encoder.prefix_vectors().detach()
    expected = 0.7 * vectors["x"] + 0.3 * vectors["y"]
    check_params_and_output(model, arch, "xy", {"model_adapters.<new>.embedding.weight": expected})


# ---- errors ----------------------------------------------------------------------------------
def error_model() -> PeftModel:
    model = lora_model("llama")
    more = {
        "ms": LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "i": IA3Config(init_ia3_weights=False),
        "i_roles": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[]),
        "i_mods": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "bn4": BottleneckConfig(reduction_factor=4),
        "bn8": BottleneckConfig(reduction_factor=8),
        "bn_gelu": BottleneckConfig(reduction_factor=4, non_linearity="gelu"),
        "p3": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "p4": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    for name, config in more.items():
        model.add_adapter(name, config)
    return model


def snapshot(model: PeftModel) -> tuple[Any, ...]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    layout = [(n, type(m).__name__) for n, m in model.named_modules()]
    return sorted(model.peft_config), model.active_adapters, params, flags, layout


def assert_unchanged(model: PeftModel, before: tuple[Any, ...]) -> None:
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3] and after[4] == before[4]
    assert set(after[2]) == set(before[2])
    assert all(torch.equal(after[2][n], p) for n, p in before[2].items())


ERRORS: list[tuple[Any, Any, str, str, dict[str, Any], str]] = [
    (["a", "zz"], [1, 1], "n", "cat", {}, "no adapter named 'zz'"),
    ("a", [1], "n", "cat", {}, "must be a list of adapter names"),
    ([], [], "n", "cat", {}, "adapters is empty"),
    (["a", "b"], [1.0], "n", "cat", {}, "weights has 1 entries but adapters has 2"),
    (["a"], [float("nan")], "n", "cat", {}, "not finite"),
    (["a"], [float("inf")], "n", "cat", {}, "not finite"),
    (["a"], ["1"], "n", "cat", {}, "is not a number"),
    (["a", "b"], [1, 1], "b", "cat", {}, "'b' exists already"),
    (["a", "b"], [1, 1], "bad.name", "cat", {}, "is not usable"),
    (
        ["a", "i"],
        [1, 1],
        "n",
        "cat",
        {},
        "different methods cannot be combined: 'a' \\(LORA\\), 'i' \\(IA3\\)",
    ),
    (["a", "b"], [1, 1], "n", "tie", {}, "'tie' is not available for LORA adapters; use one of 'linear'"),
    (["i", "i"], [1, 1], "n", "svd", {}, "'svd' is not available for IA3 adapters; use one of 'linear'$"),
    (["a", "b"], [1, 1], "n", "linear", {}, "'linear' needs adapters of one rank, got r=4 \\('a'\\), r=2"),
    (["a", "b"], [1, 1], "n", "svd", {"svd_rank": 0}, "svd_rank: must be a positive integer"),
    (
        ["a", "b"],
        [1, 1],
        "n",
        "cat",
        {"svd_rank": 2},
        "svd_rank applies to combination_type 'svd' / .* not 'cat'",
    ),
    (["a", "ms"], [1, 1], "n", "cat", {}, "'ms' trains whole modules .*does not support modules_to_save"),
    (["i", "i_mods"], [1, 1], "n", "linear", {}, "sit on different modules"),
    (["i", "i_roles"], [1, 1], "n", "linear", {}, "scale .*down_proj differently"),
    (["bn4", "bn8"], [1, 1], "n", "linear", {}, "differ in shape .*bottleneck size 8 vs 4"),
    (["bn4", "bn_gelu"], [1, 1], "n", "linear", {}, "different non-linearities"),
    (["p3", "p4"], [1, 1], "n", "linear", {}, "differ in num_virtual_tokens \\(3 vs 4\\)"),
]


@pytest.mark.parametrize(("adapters", "weights", "name", "kind", "kwargs", "match"), ERRORS)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    adapters: Any, weights: Any, name: str, kind: str, kwargs: dict[str, Any], match: str
) -> None:
    model = error_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kwargs)
    assert_unchanged(model, before)


def test_unknown_options_are_refused() -> None:
    model = error_model()
    with pytest.raises(TypeError, match=r"unsupported options \['svd_clam'\].*the options are svd_rank"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "n", combination_type="svd", svd_clam=0.9)
    with pytest.raises(
        TypeError, match=r"unsupported options \['density'\]; IA3 combinations take no options"
    ):
        model.add_weighted_adapter(["i", "i"], [1, 1], "n", density=0.5)


def test_non_finite_inputs_and_overflow_leave_the_model_unchanged() -> None:
    model = lora_model("llama")
    before = snapshot(model)
    # 1e39 is a finite weight, but A * w * s overflows float32 once the adapter exists: rolled back
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        model.add_weighted_adapter(["a", "b"], [1e39, 1.0], "n", combination_type="cat")
    assert_unchanged(model, before)
    with torch.no_grad():
        units(model, "b")["model.layers.1.self_attn.o_proj"].lora_B.weight[0, 0] = float("nan")
    layout = snapshot(model)[4]
    with pytest.raises(ValueError, match="adapter 'b' has NaN/inf parameters"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "n", combination_type="cat")
    assert "n" not in model.peft_config and snapshot(model)[4] == layout


# ---- checkpoints and HF PEFT ---------------------------------------------------------------
def test_combined_lora_saves_and_loads_in_peftlab_and_peft(tmp_path: Path) -> None:
    model = lora_model("llama")
    model.add_weighted_adapter(["a", "b"], [W["a"], W["b"]], "ab", combination_type="cat")
    model.set_adapter("ab")
    inputs = sample_inputs("llama")
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    saved = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == 6
    assert sorted(saved["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path / "ab")
    assert_close(model_output(loaded, inputs), expected)
    theirs = peft.PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "ab"))
    assert_close(model_output(theirs, inputs), expected)


def peft_twin(model: PeftModel, arch: str, names: list[str]) -> Any:
    """HF PEFT's model with the same adapters and weights as ours."""
    configs = lora_configs(arch)
    twin = None
    for name in names:
        ours = configs[name]
        config = peft.LoraConfig(
            r=ours.r,
            lora_alpha=ours.lora_alpha,
            use_rslora=ours.use_rslora,
            target_modules=ours.target_modules,
            init_lora_weights=False,
        )
        if twin is None:
            twin = peft.get_peft_model(build_model(arch), config, adapter_name=name)
        else:
            twin.add_adapter(name, config)
    assert twin is not None
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for name in names:
            for path, p in model.adapter_parameters(name).items():
                theirs[peft_name(path, name)].copy_(p)
    twin.eval()
    return twin


@pytest.mark.filterwarnings("ignore:Adapter name")  # PEFT's note on names inside "lora_"
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_combinations_agree_with_hf_peft(arch: str) -> None:
    model = lora_model(arch)
    twin = peft_twin(model, arch, ["a", "b", "c"])
    calls: list[tuple[list[str], str, dict[str, Any]]] = [
        (["a", "b"], "cat", {}),
        (["a", "b"], "svd", {"svd_rank": 3}),
        (["a", "c"], "linear", {}),
    ]
    inputs = sample_inputs(arch)
    for names, kind, kwargs in calls:
        weights = [W[n] for n in names]
        model.add_weighted_adapter(names, weights, kind, combination_type=kind, **kwargs)
        twin.add_weighted_adapter(names, weights, kind, combination_type=kind, **kwargs)
        for module, unit in units(model, kind).items():
            layer = twin.base_model.model.get_submodule(module)
            theirs = layer.get_delta_weight(kind)
            assert_close(unit.delta_weight(), theirs.T if is_conv1d(layer.base_layer) else theirs)
            if kind != "svd":  # an SVD's factors are defined up to signs; its delta is not
                assert_close(unit.lora_A.weight, layer.lora_A[kind].weight)
                assert_close(unit.lora_B.weight, layer.lora_B[kind].weight)
        model.set_adapter(kind)
        twin.set_adapter(kind)
        assert_close(model_output(model, inputs), model_output(twin, inputs))
