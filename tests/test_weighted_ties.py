"""``add_weighted_adapter``'s TIES, DARE and magnitude-pruning types for LoRA against HF PEFT.

The same adapters (B != 0) in peftlab and PEFT, combined with the same weights, density and
seed: the new adapter's factors (the types on A and B) or delta (the ``*_svd`` types, whose
factors are defined up to signs), the model outputs, and the random draws used, agree.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import model_output, sample_inputs
from peftlab.core.layers import is_conv1d
from suite_helpers import assert_close
from test_weighted import W, assert_unchanged, error_model, lora_model, peft_twin, snapshot, units

FACTOR_TYPES = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_TYPES = ["ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]

# (combination type, options): every new type, both sign methods, density 1, the SVD options
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune", {"density": 1.0}),
    ("ties_svd", {"density": 0.5, "svd_rank": 3}),
    ("ties_svd", {"density": 0.5, "majority_sign_method": "frequency", "svd_full_matrices": False}),
    ("dare_linear_svd", {"density": 0.6}),
    ("dare_ties_svd", {"density": 0.5, "svd_rank": 2}),
    ("dare_ties_svd", {"density": 0.4, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.3, "svd_rank": 3}),
    ("magnitude_prune_svd", {"density": 0.5, "svd_clamp": 0.9}),
    ("svd", {"svd_rank": 2, "svd_clamp": 0.95}),  # rank <= every delta's: see _delta_svd
]


@pytest.mark.filterwarnings("ignore:Adapter name")  # PEFT's note on names inside "lora_"
@pytest.mark.filterwarnings("ignore:The density")  # PEFT's note that density 1 prunes nothing
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("kind", "options"), CALLS)
def test_new_types_agree_with_hf_peft(arch: str, kind: str, options: dict[str, Any]) -> None:
    model = lora_model(arch)
    twin = peft_twin(model, arch, ["a", "b", "c"])
    # the types on A and B need one rank: a and c (r=4); the others take b (r=2, rsLoRA) too
    for names, weights in (
        (["a", "c"], [W["a"], W["c"]]),
        (["a", "c"], [W["a"], -W["c"]]),
        (["a", "b", "c"], [W["a"], W["b"], W["c"]]),
    ):
        if kind in FACTOR_TYPES and "b" in names:
            continue
        new = f"n{len(names)}{'m' if weights[-1] < 0 else 'p'}"
        torch.manual_seed(7)
        model.add_weighted_adapter(names, weights, new, combination_type=kind, **options)
        ours_rng = torch.get_rng_state()
        torch.manual_seed(7)
        twin.add_weighted_adapter(names, weights, new, combination_type=kind, **options)
        assert torch.equal(ours_rng, torch.get_rng_state())  # the same number of draws
        got = units(model, new)
        assert got
        for module, unit in got.items():
            layer = twin.base_model.model.get_submodule(module)
            theirs = layer.get_delta_weight(new)
            assert_close(unit.delta_weight(), theirs.T if is_conv1d(layer.base_layer) else theirs)
            if kind in FACTOR_TYPES:
                assert_close(unit.lora_A.weight, layer.lora_A[new].weight)
                assert_close(unit.lora_B.weight, layer.lora_B[new].weight)
        inputs = sample_inputs(arch)
        model.set_adapter(new)
        twin.set_adapter(new)
        assert_close(model_output(model, inputs), model_output(twin, inputs))


def test_pruning_prunes_and_ties_elect_signs() -> None:
    """Independent of PEFT: magnitude_prune keeps the largest entries; TIES averages agreeing ones."""
    model = lora_model("llama")
    model.add_weighted_adapter(["a"], [1.0], "pruned", combination_type="magnitude_prune", density=0.5)
    for module, unit in units(model, "pruned").items():
        source = units(model, "a")[module]
        for mine, theirs in (
            (unit.lora_A.weight, source.lora_A.weight),
            (unit.lora_B.weight, source.lora_B.weight),
        ):
            kept = mine != 0
            assert kept.sum() == int(0.5 * theirs.numel())
            assert theirs.abs()[kept].min() >= theirs.abs()[~kept].max()
    model.add_weighted_adapter(["a", "a"], [1.0, 1.0], "same", combination_type="ties", density=1.0)
    for module, unit in units(model, "same").items():
        # two equal inputs agree everywhere: each factor is the mean of two equal terms, so the
        # delta is a's own (where "linear" would double it)
        assert_close(unit.delta_weight(), units(model, "a")[module].delta_weight())


BAD: list[tuple[list[str], str, dict[str, Any], str]] = [
    (["a", "c"], "ties", {}, "combination_type='ties' needs density.*pass e.g. density=0.5"),
    (["a", "c"], "ties", {"density": 0.0}, "density: 0.0 is outside \\(0, 1\\]"),
    (["a", "c"], "dare_linear", {"density": 1.5}, "density: 1.5 is outside \\(0, 1\\]"),
    (["a", "c"], "dare_ties", {"density": "half"}, "density: 'half' is not a number"),
    (["a", "c"], "ties", {"density": True}, "density: True is not a number"),
    (["a", "c"], "ties", {"density": 0.5, "majority_sign_method": "mean"}, "unknown 'mean'; use 'total'"),
    (["a", "c"], "dare_linear", {"density": 0.5, "majority_sign_method": "total"}, "applies to .*'ties'"),
    (["a", "c"], "cat", {"density": 0.5}, "density applies to combination_type 'ties' / .* not 'cat'"),
    (["a", "b"], "ties", {"density": 0.5}, "'ties' needs adapters of one rank.*use 'ties_svd'"),
    (["a", "b"], "ties_svd", {"density": 0.5, "svd_clamp": 2}, "svd_clamp: must be a quantile in \\(0, 1\\]"),
    (["a", "b"], "ties_svd", {"density": 0.5, "svd_driver": "x"}, "svd_driver: unknown 'x'"),
    (["a", "b"], "svd", {"svd_full_matrices": 1}, "svd_full_matrices: must be True or False"),
    (["a", "b"], "cat", {"svd_clamp": 0.9}, "svd_clamp applies to .*'svd' / 'ties_svd'"),
    (["i", "i"], "ties", {"density": 0.5}, "'ties' is not available for IA3 adapters; use one of 'linear'$"),
    (["i", "i"], "dare_linear_svd", {}, "'dare_linear_svd' is not available for IA3 adapters"),
]


@pytest.mark.parametrize(("adapters", "kind", "options", "match"), BAD)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    adapters: list[str], kind: str, options: dict[str, Any], match: str
) -> None:
    model = error_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(adapters, [1.0] * len(adapters), "n", combination_type=kind, **options)
    assert_unchanged(model, before)
