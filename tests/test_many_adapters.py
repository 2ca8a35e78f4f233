"""Many adapters on one model: per-sample ``adapter_names``, ``Stack`` / ``Parallel``, merging.

Every adapter is initialised away from identity (LoRA B != 0, IA3 != 1, bottleneck up != 0,
random prefixes) so "equal to running it alone" cannot hold by accident; each test also checks
that the adapters really change the outputs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import ARCHS, build_model, sample_inputs
from peftlab import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    Parallel,
    PeftModel,
    PrefixTuningConfig,
    Stack,
)
from peftlab.core.injection import wrapped_modules
from suite_helpers import TASKS, assert_close, differs, perturb

ADAPTERS = ("lora", "lora8", "ia3", "bn", "prefix")


def configs(arch: str) -> dict[str, Any]:
    task = TASKS[arch]
    return {
        "lora": LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type=task
        ),
        "lora8": LoraConfig(r=8, lora_alpha=4, init_lora_weights=False, task_type=task),
        "ia3": IA3Config(init_ia3_weights=False, task_type=task),
        "ia3b": IA3Config(init_ia3_weights=False, task_type=task),
        "bn": BottleneckConfig(reduction_factor=4, non_linearity="gelu", task_type=task),
        "prefix": PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    }


def many(arch: str, names: tuple[str, ...] = ADAPTERS) -> PeftModel:
    model = PeftModel(build_model(arch))
    for name in names:
        model.add_adapter(name, configs(arch)[name])
        # move every adapter clearly away from identity (the bottleneck init is small)
        perturb(model.adapter_parameters(name).values(), seed=len(name), scale=0.3)
    model.set_adapter(names[0])
    model.eval()
    return model


def padded_inputs(arch: str, batch: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """A batch whose rows have different lengths (left padding for decoders, right for the rest)."""
    inputs = sample_inputs(arch, batch=batch, seq=7, seed=seed)
    mask = torch.ones_like(inputs["input_ids"])
    for i in range(batch):
        pad = i % 3
        if pad:
            if arch in ("llama", "gpt2"):
                mask[i, :pad] = 0
            else:
                mask[i, -pad:] = 0
    inputs["attention_mask"] = mask
    inputs["input_ids"] = inputs["input_ids"].masked_fill(mask == 0, 0)
    return inputs


def row(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in inputs.items()}


def alone(model: PeftModel, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(**inputs).logits
        model.set_adapter(name)
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_forward_equals_each_alone(arch: str) -> None:
    model = many(arch)
    names = ["lora", "__base__", "ia3", "bn", "prefix", "lora8", "prefix", "lora"]
    inputs = padded_inputs(arch, len(names))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    base = alone(model, "__base__", inputs)
    for i, name in enumerate(names):
        expected = alone(model, name, row(inputs, i))
        assert_close(mixed[i : i + 1], expected)
        if name != "__base__":
            assert differs(expected, base[i : i + 1]), f"{name} does not change the output"
    # the call leaves no routing behind: the active adapter runs as before
    model.set_adapter("lora")
    assert_close(model(**row(inputs, 0)).logits, alone(model, "lora", row(inputs, 0)))


def test_bottlenecks_of_two_non_linearities_on_some_rows_equal_each_alone() -> None:
    """Only the rows whose adapter has a bottleneck run one (the others' output is their input),
    each through its own non-linearity, in a Stack too; gradients reach only those adapters."""
    model = many("llama", ("bn", "lora"))
    model.add_adapter("bn_relu", BottleneckConfig(reduction_factor=8, non_linearity="relu"))
    perturb(model.adapter_parameters("bn_relu").values(), seed=5, scale=0.3)
    model.eval()
    names: list[Any] = ["__base__", "bn_relu", "lora", "bn", Stack("bn_relu", "lora"), "__base__"]
    inputs = padded_inputs("llama", len(names))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for i, name in enumerate(names):
        assert_close(mixed[i : i + 1], alone(model, name, row(inputs, i)))
    model.train()
    model.zero_grad()
    model(
        **inputs, adapter_names=["__base__", "bn_relu", "lora", "lora", "__base__", "lora"]
    ).logits.sum().backward()
    grads = {
        n: any(p.grad is not None and bool(p.grad.any()) for p in model.adapter_parameters(n).values())
        for n in ("bn", "bn_relu", "lora")
    }
    assert grads == {"bn": False, "bn_relu": True, "lora": True}


def test_one_adapter_for_all_samples_equals_set_adapter() -> None:
    model = many("llama")
    inputs = padded_inputs("llama", 4)
    for name in ADAPTERS:
        with torch.no_grad():
            routed = model(**inputs, adapter_names=[name] * 4).logits
        assert_close(routed, alone(model, name, inputs))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_per_sample_generate_equals_each_alone(arch: str) -> None:
    model = many(arch)
    names = ["prefix", "lora", "__base__", "bn", "ia3", "lora8"]
    inputs = padded_inputs(arch, len(names))
    inputs.pop("decoder_input_ids", None)
    kw: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "output_scores": True}
    kw["return_dict_in_generate"] = True
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=names, **kw)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    solo = model.generate(**row(inputs, i), **kw)
            else:
                model.set_adapter(name)
                solo = model.generate(**row(inputs, i), **kw)
            n = solo.sequences.shape[1]
            assert torch.equal(mixed.sequences[i, :n], solo.sequences[0]), name
            for step, scores in enumerate(solo.scores):
                assert_close(mixed.scores[step][i : i + 1], scores)


def test_beam_search_with_per_sample_adapters() -> None:
    model = many("llama", ("lora", "prefix"))
    inputs = padded_inputs("llama", 3)
    names = ["lora", "prefix", "__base__"]
    kw: dict[str, Any] = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=names, **kw)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    solo = model.generate(**row(inputs, i), **kw)
            else:
                model.set_adapter(name)
                solo = model.generate(**row(inputs, i), **kw)
            assert torch.equal(mixed[i, : solo.shape[1]], solo[0])


def test_per_sample_gradients_reach_each_adapter() -> None:
    model = many("llama", ("lora", "bn"))
    model.train_adapter(["lora", "bn"])
    inputs = padded_inputs("llama", 2)
    out = model(**inputs, adapter_names=["lora", "bn"]).logits
    out.pow(2).mean().backward()
    for name in ("lora", "bn"):
        grads = [p.grad for p in model.adapter_parameters(name).values()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_adapter_names_errors() -> None:
    model = many("llama", ("lora", "ia3"))
    inputs = padded_inputs("llama", 2)
    with pytest.raises(ValueError, match="one entry per sample"):
        model(**inputs, adapter_names=["lora"])
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model(**inputs, adapter_names=["lora", "nope"])
    with pytest.raises(ValueError, match="one entry per sample"):
        model(**inputs, adapter_names="lora")  # type: ignore[arg-type]
    with model.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        model(**inputs, adapter_names=["lora", "ia3"])
    model.set_adapter("lora")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(**inputs, adapter_names=["lora", "ia3"])
    model.unmerge_adapter()
    # a failed call leaves no routing behind
    with torch.no_grad():
        assert_close(model(**inputs).logits, alone(model, "lora", inputs))


def test_modules_to_save_heads_per_sample() -> None:
    """BERT classification: each adapter has its own trained head copy; rows use their own."""
    model = many("bert", ("lora", "ia3"))
    classifier = model.base_model.classifier
    heads = {"lora": classifier.modules_to_save["lora"], "ia3": classifier.modules_to_save["ia3"]}
    heads["__base__"] = classifier.original_module
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # each adapter's head far from the other's and from the frozen original
        for name in ("lora", "ia3"):
            for p in heads[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    assert differs(heads["lora"].weight, heads["ia3"].weight)
    inputs = padded_inputs("bert", 3)
    names = ["ia3", "lora", "__base__"]
    reached: list[torch.Tensor] = []  # what the head receives, one row per sample
    hook = classifier.register_forward_pre_hook(lambda _, args: reached.append(args[0]))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    hook.remove()
    (pooled,) = reached
    for i, name in enumerate(names):
        assert_close(mixed[i : i + 1], alone(model, name, row(inputs, i)))
        with torch.no_grad():
            by_head = {other: head(pooled[i : i + 1]) for other, head in heads.items()}
        # the row's output is its own head's, and any other head would have said something else
        assert_close(mixed[i : i + 1], by_head[name])
        for other in set(heads) - {name}:
            assert differs(by_head[other], by_head[name]), (name, other)


# ---- composition blocks ----------------------------------------------------------------------
def test_stack_equals_list_and_composes_in_order() -> None:
    model = many("llama", ("bn", "lora", "ia3", "prefix"))
    inputs = padded_inputs("llama", 3)
    bn2 = BottleneckConfig(reduction_factor=8, task_type=TASKS["llama"])
    model.add_adapter("bn2", bn2)
    perturb(model.adapter_parameters("bn2").values(), seed=9, scale=0.3)
    with torch.no_grad():
        model.set_adapter(Stack("bn", "bn2", "lora", "ia3", "prefix"))
        stacked = model(**inputs).logits
        assert model.active_adapters == ["bn", "bn2", "lora", "ia3", "prefix"]
        assert model.active_composition == Stack("bn", "bn2", "lora", "ia3", "prefix")
        model.set_adapter(["bn", "bn2", "lora", "ia3", "prefix"])
        assert_close(model(**inputs).logits, stacked)
        model.set_adapter(Stack("bn2", "bn", "lora", "ia3", "prefix"))
        # bottleneck after bottleneck: the order matters
        assert differs(model(**inputs).logits, stacked)
        # a Stack per sample equals the Stack set for the whole batch
        model.set_adapter("lora")
        routed = model(**inputs, adapter_names=[Stack("bn", "bn2", "lora", "ia3", "prefix")] * 3).logits
        assert_close(routed, stacked)


def test_stack_of_one_method_by_hand() -> None:
    """Stack of two LoRA adapters adds their deltas; of two IA3 adapters multiplies scales: each
    equals the base model with its weights changed by hand."""
    inputs = padded_inputs("llama", 2)
    # LoRA: W + s B A of each, s = alpha / r (lora: 8 / 4, lora8: 4 / 8)
    model = many("llama", ("lora", "lora8"))
    scaling = {"lora": 8 / 4, "lora8": 4 / 8}
    by_hand = build_model("llama")
    for path, wrapper in wrapped_modules(model.base_model):
        weight = by_hand.get_submodule(path).weight
        for name in set(wrapper.adapters) & set(scaling):
            unit = wrapper.adapters[name]
            with torch.no_grad():
                weight += scaling[name] * unit.lora_B.weight @ unit.lora_A.weight
    with torch.no_grad():
        model.set_adapter(Stack("lora", "lora8"))
        both = model(**inputs).logits
        assert_close(both, by_hand(**inputs).logits)
        model.merge_adapter()  # merging adds both deltas into W
        assert_close(model(**inputs).logits, both)
        model.unmerge_adapter()
        assert differs(both, alone(model, "lora", inputs))
        assert differs(both, alone(model, "lora8", inputs))
    # IA3: k and v scale their outputs (rows of W), down_proj its inputs (columns of W), by the
    # product of the two adapters' vectors
    model = many("llama", ("ia3", "ia3b"))
    by_hand = build_model("llama")
    scaled = 0
    for path, wrapper in wrapped_modules(model.base_model):
        first, second = wrapper.adapters["ia3"], wrapper.adapters["ia3b"]
        product = first.ia3_l * second.ia3_l  # (out, 1) or (1, in): broadcasts over W (out, in)
        assert differs(product, first.ia3_l) and differs(product, second.ia3_l)
        with torch.no_grad():
            by_hand.get_submodule(path).weight.mul_(product)
        scaled += 1
    assert scaled == 2 * 3
    with torch.no_grad():
        model.set_adapter(Stack("ia3", "ia3b"))
        both = model(**inputs).logits
        assert_close(both, by_hand(**inputs).logits)
        assert differs(both, alone(model, "ia3", inputs))


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_parallel_stacks_outputs_along_the_batch(arch: str) -> None:
    model = many(arch)
    inputs = padded_inputs(arch, 2)
    block = Parallel("lora", Stack("bn", "ia3"), "prefix")
    model.set_adapter(block)
    assert model.active_adapters == ["lora", "bn", "ia3", "prefix"]
    with torch.no_grad():
        out = model(**inputs).logits
    assert out.shape[0] == 6
    expected = [alone(model, "lora", inputs)]
    model.set_adapter(Stack("bn", "ia3"))
    with torch.no_grad():
        expected.append(model(**inputs).logits)
    expected.append(alone(model, "prefix", inputs))
    for k, exp in enumerate(expected):
        assert_close(out[2 * k : 2 * k + 2], exp)
    assert differs(expected[0], expected[2])


def test_parallel_generate_and_errors() -> None:
    model = many("llama", ("lora", "ia3"))
    inputs = padded_inputs("llama", 2)
    model.set_adapter(Parallel("lora", "ia3"))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 4
    with pytest.raises(ValueError, match="Parallel"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="Parallel"):
        model(**inputs, adapter_names=["lora", "ia3"])
    with pytest.raises(ValueError, match="adapter names only"):
        Stack("a", Parallel("b", "c"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not nest"):
        Parallel("a", Parallel("b", "c"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least two"):
        Parallel("a")
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        model.set_adapter(Stack("lora", "zzz"))
    with pytest.raises(ValueError, match="repeat"):
        Stack("lora", "lora")


# ---- merging several adapters ----------------------------------------------------------------
def test_merge_several_lora_and_ia3_and_switch() -> None:
    model = many("llama", ("lora", "lora8", "ia3", "bn"))
    inputs = padded_inputs("llama", 2)
    with torch.no_grad():
        model.set_adapter(["lora", "lora8", "ia3"])
        together = model(**inputs).logits
        model.merge_adapter()
        assert sorted(model.merged_adapters) == ["ia3", "lora", "lora8"]
        assert_close(model(**inputs).logits, together)
        # switching the active adapter of a merged model unmerges first
        model.set_adapter("bn")
        assert model.merged_adapters == []
        assert_close(model(**inputs).logits, alone(model, "bn", inputs))
        model.set_adapter(["lora", "lora8", "ia3"])
        plain = model.merge_and_unload(["lora", "lora8", "ia3"])
        assert_close(plain(**inputs).logits, together)


def test_adapter_name_that_shadows_a_module_method_is_refused() -> None:
    model = many("llama", ("lora",))
    for name in ("half", "train", "forward"):
        with pytest.raises(ValueError, match=r"torch\.nn\.Module method"):
            model.add_adapter(name, LoraConfig(r=2))
    assert list(model.peft_config) == ["lora"]


# ---- gathered weights kept across calls ------------------------------------------------------
class GatherSpy:
    """Counts the stacking and gathering of per-sample weights, per method."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from peftlab.methods import bottleneck, lora
        from peftlab.methods.prefix import encoder

        self.counts: dict[str, int] = {"lora": 0, "bn": 0, "prefix": 0}
        for key, module, attr in (
            ("lora", lora, "_stacked"),
            ("bn", bottleneck, "_gathered"),
            ("prefix", encoder, "_routed_call"),
        ):
            monkeypatch.setattr(module, attr, self.counting(key, getattr(module, attr)))

    def counting(self, key: str, fn: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.counts[key] += 1
            return fn(*args, **kwargs)

        return spy

    def total(self) -> int:
        return sum(self.counts.values())


def test_gathered_weights_are_reused_across_calls_and_never_stale(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    model = many("llama")
    spy = GatherSpy(monkeypatch)
    names = ["lora", "ia3", "__base__", "bn", "prefix"]
    inputs = padded_inputs("llama", len(names))

    def routed() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, adapter_names=names).logits  # type: ignore[no-any-return]

    def check_each_alone(out: torch.Tensor) -> None:
        for i, name in enumerate(names):
            if name == "__base__":
                with torch.no_grad(), model.disable_adapter():
                    want = model(**row(inputs, i)).logits
            else:
                want = alone(model, name, row(inputs, i))
            assert_close(out[i : i + 1], want)

    first = routed()
    made = dict(spy.counts)
    assert all(made.values())  # every method gathered once ...
    assert torch.equal(routed(), first) and spy.counts == made  # ... and not again on the next call
    # another assignment of adapters to rows gathers anew; going back to the first reuses it
    with torch.no_grad():
        model(**inputs, adapter_names=list(reversed(names)))
    assert spy.total() > sum(made.values())
    again = dict(spy.counts)
    routed()
    assert spy.counts == again
    # weights written in place (as an optimizer or load_state_dict does) are seen at once
    perturb([p for k, p in model.adapter_parameters("lora").items() if "lora_B" in k], seed=7)
    perturb(model.adapter_parameters("prefix").values(), seed=8)
    changed = routed()
    assert differs(changed[0], first[0]) and differs(changed[4], first[4])
    assert_close(changed[1], first[1])  # rows on untouched adapters are what they were
    check_each_alone(changed)
    # an adapter replaced under the same name (unload, then load another folder as "lora")
    other = many("llama", ("lora8",))
    other.save_pretrained(tmp_path)
    model.delete_adapter("lora")
    model.load_adapter(tmp_path / "lora8", adapter_name="lora")
    replaced = routed()
    assert differs(replaced[0], changed[0])
    check_each_alone(replaced)
    # an adapter combined from others (a new name) runs as itself
    model.add_weighted_adapter(["lora", "lora8"], [0.5, 0.5], "mix", combination_type="cat")
    names[2] = "mix"
    check_each_alone(routed())
    # with autograd (training) nothing is kept: every call gathers anew
    seen = [spy.counts["lora"]]
    for _ in range(2):
        model(**inputs, adapter_names=names)
        seen.append(spy.counts["lora"])
    assert seen[2] - seen[1] == seen[1] - seen[0] > 0
