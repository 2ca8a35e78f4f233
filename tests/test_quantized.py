"""Adapters on a base quantized by bitsandbytes (NF4 / FP4 / int8), on the CPU.

Every method over a quantized layer is checked against the same method over the de-quantized
weights (the quantized layer's forward is bitsandbytes'; the reference is a plain nn.Linear
holding exactly the weights it computes with), so the tolerances below bound only the
difference between bitsandbytes' matmul and PyTorch's, not the quantization error itself:

- NF4 / FP4: the CPU kernel de-quantizes and multiplies in float32: ``ATOL_4BIT``;
- int8 (LLM.int8(), outlier threshold 6): activations are rounded to int8 per row, so the outputs
  differ by up to a few int8 steps: ``ATOL_INT8`` (relative to the logits' scale, ~1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import build_model, sample_inputs
from peftlab import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    TaskType,
    get_peft_model,
)
from peftlab.core import quantized
from peftlab.core.injection import output_head_names
from suite_helpers import assert_close, differs, perturb

bnb = pytest.importorskip("bitsandbytes")

ATOL_4BIT = 1e-4
ATOL_INT8 = 3e-2
SCHEMES = ("nf4", "fp4", "int8")
TASK = TaskType.CAUSAL_LM


def method_configs() -> dict[str, Any]:
    return {
        "lora": LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type=TASK
        ),
        "ia3": IA3Config(init_ia3_weights=False, task_type=TASK),
        "bn": BottleneckConfig(reduction_factor=4, non_linearity="gelu", task_type=TASK),
        "prefix": PrefixTuningConfig(task_type=TASK, num_virtual_tokens=3),
    }


def quantized_llama(scheme: str, double_quant: bool = False) -> nn.Module:
    model = build_model("llama")
    config = quantized.bnb_config(scheme, double_quant=double_quant)
    return quantized.quantize_model(model, config, skip=output_head_names(model))


def dequantized_twin(model: nn.Module) -> nn.Module:
    """The same model with every quantized layer a plain nn.Linear of its de-quantized weight."""
    for name, module in quantized.quantized_modules(model):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quantized.dequantize_linear(module))
    return model


def with_adapters(base: nn.Module, names: tuple[str, ...]) -> PeftModel:
    model = PeftModel(base)
    for name in names:
        model.add_adapter(name, method_configs()[name])
        # the same values on both twins: a seeded perturbation away from identity
        perturb(model.adapter_parameters(name).values(), seed=len(name), scale=0.3)
    model.set_adapter(names[0])
    return model.eval()


def logits(model: nn.Module, inputs: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).logits


def atol(scheme: str) -> float:
    return ATOL_INT8 if scheme == "int8" else ATOL_4BIT


def test_quantize_model_replaces_linear_layers_but_the_head() -> None:
    model = quantized_llama("nf4", double_quant=True)
    layers = dict(quantized.quantized_modules(model))
    assert len(layers) == 2 * 7  # q k v o gate up down per layer
    assert not quantized.is_quantized(model.lm_head)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.quant_type == "nf4" and q.weight.compress_statistics
    assert quantized.module_scheme(q) == "nf4"
    # the packed codes count as the weights they hold: the same total as the fp32 model
    from peftlab.core.peft_model import count_parameters

    assert count_parameters(model)[1] == count_parameters(build_model("llama"))[1]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", ["lora", "ia3", "bn", "prefix"])
def test_method_over_quantized_equals_over_dequantized(method: str, scheme: str) -> None:
    inputs = sample_inputs("llama")
    q = with_adapters(quantized_llama(scheme), (method,))
    ref = with_adapters(dequantized_twin(quantized_llama(scheme)), (method,))
    theirs = ref.adapter_parameters(method)
    with torch.no_grad():
        for name, value in q.adapter_parameters(method).items():
            theirs[name].copy_(value)
    for p in q.adapter_parameters(method).values():
        assert p.dtype == torch.float32  # adapters stay full precision over integer codes
    out, expected = logits(q, inputs), logits(ref, inputs)
    assert_close(out, expected, atol=atol(scheme))
    with q.disable_adapter():
        assert differs(out, logits(q, inputs)), f"{method} does not change the output"


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_mixed_batch_of_all_four_methods_equals_each_alone(scheme: str) -> None:
    names = ("lora", "ia3", "bn", "prefix")
    model = with_adapters(quantized_llama(scheme), names)
    order = ["lora", "__base__", "ia3", "bn", "prefix", "lora"]
    inputs = sample_inputs("llama", batch=len(order), seq=6, seed=4)
    mixed = logits(model, inputs, adapter_names=order)
    for i, name in enumerate(order):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, row)
        else:
            model.set_adapter(name)
            alone = logits(model, row)
        assert_close(mixed[i : i + 1], alone, atol=atol(scheme))


def test_training_over_nf4_reduces_the_loss_and_leaves_the_codes() -> None:
    base = quantized_llama("nf4")
    quantized.prepare_for_kbit_training(base, gradient_checkpointing=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=TASK))
    codes = {n: m.weight.detach().clone() for n, m in quantized.quantized_modules(model)}
    inputs = sample_inputs("llama", batch=4, seq=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, m in quantized.quantized_modules(model):
        assert torch.equal(m.weight, codes[n])


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merge_and_unload_dequantizes_and_folds(scheme: str) -> None:
    inputs = sample_inputs("llama")
    model = with_adapters(quantized_llama(scheme), ("lora", "ia3"))
    model.set_adapter(["lora", "ia3"])
    adapted = logits(model, inputs)
    with pytest.raises(ValueError, match="in place") as err:
        model.merge_adapter()
    assert "\n" not in str(err.value) and "merge_and_unload" in str(err.value)
    assert_close(logits(model, inputs), adapted)  # nothing changed
    merged = model.merge_and_unload()
    assert not quantized.quantized_modules(merged)
    assert not hasattr(merged.config, "quantization_config")
    # the only difference left is bitsandbytes' matmul vs PyTorch's on the same weights
    assert_close(logits(merged, inputs), adapted, atol=atol(scheme))


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merge_and_requantize_error_is_measured_and_bounded(scheme: str) -> None:
    """Re-quantizing W + dW rounds it once more. With a delta the size of the base weights the
    merged model's max logit error against the adapted one is about twice the base's own
    quantization error (measured here: NF4 0.159 vs 0.077, int8 0.0055 vs 0.0025): bounded at 3x."""
    inputs = sample_inputs("llama")
    full = logits(build_model("llama"), inputs)
    base = logits(quantized_llama(scheme), inputs)
    quant_error = (base - full).abs().max().item()
    model = get_peft_model(quantized_llama(scheme), method_configs()["lora"])
    with torch.no_grad():  # a delta of the base weights' size (std 0.02), as training makes
        for name, param in model.adapter_parameters("default").items():
            param.copy_(torch.randn_like(param) * (0.02 if "lora_B" in name else 0.3))
    adapted = logits(model, inputs)
    print(f"{scheme}: adapter changes logits by {(adapted - base).abs().max().item():.4f}")
    merged = model.merge_and_unload(requantize=True)
    layers = dict(quantized.quantized_modules(merged))
    assert len(layers) == 14 and quantized.module_scheme(next(iter(layers.values()))) == scheme
    merge_error = (logits(merged, inputs) - adapted).abs().max().item()
    print(f"{scheme}: quantization error {quant_error:.4f}, merge error {merge_error:.4f}")
    assert 0 < merge_error < 3 * quant_error, (merge_error, quant_error)


def test_requantize_needs_a_quantized_base() -> None:
    model = get_peft_model(build_model("llama"), LoraConfig(task_type=TASK))
    with pytest.raises(ValueError, match="needs a quantized base"):
        model.merge_and_unload(requantize=True)


def test_checkpoint_from_nf4_loads_on_full_precision_and_in_hf_peft(tmp_path: Path) -> None:
    import peft

    inputs = sample_inputs("llama")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=TASK)
    trained = get_peft_model(quantized_llama("nf4"), config)
    trained.save_pretrained(tmp_path)
    # on the fp32 base (and back onto NF4): the same adapter, the same delta
    on_fp32 = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    on_nf4 = PeftModel.from_pretrained(quantized_llama("nf4"), tmp_path)
    for name, value in trained.adapter_parameters("default").items():
        assert torch.equal(on_fp32.adapter_parameters("default")[name], value)
        assert torch.equal(on_nf4.adapter_parameters("default")[name], value)
    assert_close(logits(on_nf4, inputs), logits(trained, inputs), atol=0)
    with torch.no_grad():
        nf4_base = logits(quantized_llama("nf4"), inputs)
    assert differs(logits(trained, inputs), nf4_base)  # the adapter acts (B != 0)
    # on the fp32 base: the adapter acts there too, and HF PEFT loading the same folder onto the
    # same fp32 base computes what peftlab does (fp32: 1e-5)
    fp32_out = logits(on_fp32, inputs)
    assert differs(fp32_out, logits(build_model("llama"), inputs))
    hf = peft.PeftModel.from_pretrained(build_model("llama"), str(tmp_path)).eval()
    assert_close(logits(hf, inputs), fp32_out, atol=1e-5)
    # and an adapter trained on the fp32 base loads onto NF4, where it computes what HF PEFT's
    # bitsandbytes LoRA layer does with it over the same NF4 base
    fp32_dir = tmp_path / "fp32"
    torch.manual_seed(1)
    get_peft_model(build_model("llama"), config).save_pretrained(fp32_dir)
    onto_nf4 = PeftModel.from_pretrained(quantized_llama("nf4"), fp32_dir).eval()
    out = logits(onto_nf4, inputs)
    assert differs(out, nf4_base)
    hf_nf4 = peft.PeftModel.from_pretrained(quantized_llama("nf4"), str(fp32_dir)).eval()
    assert_close(logits(hf_nf4, inputs), out, atol=ATOL_4BIT)


def test_hf_peft_lora_over_the_same_nf4_layers_agrees() -> None:
    """HF PEFT's own bitsandbytes LoRA layer over the same quantized model: the same outputs."""
    import peft

    inputs = sample_inputs("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours = get_peft_model(quantized_llama("nf4"), config).eval()
    theirs = peft.get_peft_model(
        quantized_llama("nf4"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ).eval()
    values = ours.adapter_parameters("default")
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            module, _, rest = name.removeprefix("base_model.model.").rpartition(".lora_")
            key = f"base_model.{module}.adapters.default.lora_{rest.replace('.default.', '.')}"
            param.data.copy_(values[key])
    assert_close(logits(theirs, inputs), logits(ours, inputs), atol=ATOL_4BIT)


# ---- bad input: one line, naming the fix --------------------------------------------------
def test_unknown_scheme_is_refused_before_loading() -> None:
    from peftlab.models import load_base_model

    with pytest.raises(ValueError, match="unknown scheme 'nf3'; choose from nf4, fp4, int8") as err:
        load_base_model("/nonexistent", quantization="nf3")
    assert "\n" not in str(err.value)


def test_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from peftlab.extras import MissingExtra
    from peftlab.models import load_base_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingExtra, match=r"pip install 'peftlab\[quant\]'"):
        load_base_model("/nonexistent", quantization="nf4")


def test_model_without_linear_layers_and_unsupported_device_are_refused() -> None:
    from peftlab.models import check_quantizable_device

    with pytest.raises(ValueError, match="no linear layers bitsandbytes can quantize"):
        quantized.quantize_model(nn.Sequential(nn.Embedding(4, 4)), quantized.bnb_config("nf4"))
    with pytest.raises(ValueError, match="cannot run on 'mps'"):
        check_quantizable_device("mps")


def test_load_base_model_quantizes_a_folder(tiny_llama: Path) -> None:
    from peftlab.models import load_causal_lm

    model, _ = load_causal_lm(str(tiny_llama), quantization="nf4", double_quant=True)
    layers = quantized.quantized_modules(model)
    assert len(layers) == 14 and all(m.weight.compress_statistics for _, m in layers)
    assert not quantized.is_quantized(model.lm_head)
    model8, _ = load_causal_lm(str(tiny_llama), quantization="int8")
    assert {quantized.module_scheme(m) for _, m in quantized.quantized_modules(model8)} == {"int8"}


# ---- peftlab train --quantize ----------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_train_on_a_quantized_base_saves_a_full_precision_adapter(
    scheme: str, tiny_llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from peftlab.training.run import run_training
    from peftlab.training.settings import RunConfig

    out = tmp_path / "out"
    config = RunConfig(
        model=str(tiny_llama), task="topic", quantize=scheme, steps=3, batch_size=2, lr=1e-2,
        num_eval=2, out=str(out), save_every=0, gradient_checkpointing=True,
    )  # fmt: skip
    result = run_training(config)
    assert len(quantized.quantized_modules(result.model)) == 14
    # the adapter loads onto the full-precision base
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    for name, value in result.model.adapter_parameters("default").items():
        assert value.dtype == torch.float32
        assert torch.equal(loaded.adapter_parameters("default")[name], value)


def test_train_checkpoints_gradients_over_a_quantized_base_unless_told_not_to(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """As QLoRA (and HF PEFT's k-bit preparation) do: on by default with --quantize, off without it,
    off for prefix tuning (which it would break), and an explicit setting wins."""
    from peftlab.training.run import run_training
    from peftlab.training.settings import RunConfig, uses_checkpointing

    runs = iter(range(10))

    def checkpointing(**kw: Any) -> bool:
        out = tmp_path / f"run{next(runs)}"
        config = RunConfig(model=str(tiny_llama), task="topic", steps=1, batch_size=2, num_eval=1,
                           save_every=0, out=str(out), **kw)  # fmt: skip
        result = run_training(config)
        on = any(getattr(m, "gradient_checkpointing", False) for m in result.model.modules())
        assert on == uses_checkpointing(config)
        return on

    assert checkpointing(quantize="nf4")
    assert not checkpointing(quantize="nf4", gradient_checkpointing=False)
    assert not checkpointing(quantize="nf4", method="prefix")
    assert not checkpointing()
    with pytest.raises(ValueError, match="prefix tuning does not work with gradient checkpointing"):
        RunConfig(task="topic", method="prefix", gradient_checkpointing=True).validate()


def test_train_quantize_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peftlab import cli

    for argv, message in [
        (["--quantize", "nf3"], "unknown scheme 'nf3'; choose from nf4, fp4, int8"),
        (["--quantize", "nf4", "--method", "full"], "quantized weights cannot train"),
    ]:
        assert cli.main(["train", "--task", "topic", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# ---- peftlab serve --quantize ----------------------------------------------------------------
def test_serve_loads_adapters_over_one_nf4_base(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftlab.serving import load_engine

    folders = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=TASK)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(
            tmp_path / name
        )
        folders[name] = str(tmp_path / name)
    engine = load_engine(str(tiny_llama), adapters=folders, device="cpu", quantization="nf4")
    model = engine.model
    assert len(quantized.quantized_modules(model)) == 14
    ids = torch.tensor([[6, 7, 8, 9], [9, 8, 7, 6]])
    kw: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["a", "b"], **kw)
        for i, name in enumerate(("a", "b")):
            model.set_adapter(name)
            assert torch.equal(mixed[i : i + 1], model.generate(input_ids=ids[i : i + 1], **kw))
    # over HTTP, as `peftlab serve --quantize nf4` serves it: each adapter says what it says alone
    from peftlab.serving.api import ServerThread, create_app
    from serve_helpers import Client

    prompt = "good bad good"
    x = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with ServerThread(create_app(engine)) as running:
        client = Client(running.url)
        texts = {}
        for name in ("a", "b"):
            status, body = client.complete(name, [prompt], max_tokens=4)
            assert status == 200, body
            model.set_adapter(name)
            with torch.no_grad():
                alone = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=0)
            want = engine.tokenizer.decode(alone[0, x.shape[1] :], skip_special_tokens=True)
            texts[name] = body["choices"][0]["text"]
            assert texts[name] == want, name


def test_serve_cli_refuses_a_bad_scheme_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from peftlab import cli

    assert cli.main(["serve", "--quantize", "nf3", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "unknown scheme 'nf3'" in err and len(err.strip().splitlines()) == 1, err


# ---- peftlab count --quantize ----------------------------------------------------------------
def test_count_estimates_a_quantized_base() -> None:
    from peftlab.count import count_methods, load_preset

    report = count_methods(load_preset("mistral-7b"), quantize="nf4")
    rows = {r.label: r for r in report.rows}
    lora = rows["LoRA (r=8, q+v)"]
    assert "nf4" not in rows["Full fine-tuning"].memory  # quantized weights cannot train
    nf4, bf16 = lora.memory["nf4"], lora.memory["bf16"]
    # 7.24B params, of which the 6.98B in linear layers but the head drop from 16 to 4.5 bits
    linear = 6_979_321_856
    assert bf16.weights - nf4.weights == pytest.approx(linear * (2 - 4.5 / 8), abs=1)
    assert nf4.gradients == bf16.gradients and nf4.optimizer == bf16.optimizer
    dq = count_methods(load_preset("mistral-7b"), quantize="nf4", double_quant=True)
    assert dq.rows[1].memory["nf4+dq"].weights < nf4.weights
    assert "4.5 bits per weight" in report.render()


# ---- peftlab compare --methods lora,qlora --------------------------------------------------
def test_compare_adds_a_lora_on_nf4_row(tiny_llama: Path, tmp_path: Path) -> None:
    import json
    import math

    from peftlab.cli import main
    from peftlab.compare.options import DEFAULT_METHODS
    from test_compare_runs import _mixed_lengths, _short_eval

    assert "qlora" not in DEFAULT_METHODS  # opt-in: it needs peftlab[quant]
    data, held = _mixed_lengths(tmp_path / "mixed.jsonl"), _short_eval(tmp_path / "held.jsonl")
    out = tmp_path / "out"
    args = ["compare", "--quick", "--model", str(tiny_llama), "--data", str(data), "--eval-data", str(held)]
    assert (
        main([*args, "--threads", "1", "--out", str(out), "--methods", "lora,qlora", "--search", "none"]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert "LoRA on NF4 base" in report and "LoRA (r=8, q+v)" in report
    assert "qlora" in json.dumps(results)
    # its estimated memory is count --quantize's: the linear layers at NF4's 4.5 bits
    rows = {r["method"]: r for r in results["methods"]}
    est = {m: rows[m]["estimated_train_memory_bytes"] for m in ("lora", "qlora")}
    assert est["qlora"]["weights"] < est["lora"]["weights"]
    assert est["qlora"]["optimizer"] == est["lora"]["optimizer"]  # the same adapter
    # real figures: the row is LoRA's adapter (LoRA r=8 on q: 32 -> 32 and v: 32 -> 2 kv heads
    # x 8 = 16, in 2 layers) trained and measured over the NF4 base, which cannot merge
    qlora = rows["qlora"]
    assert qlora["label"] == "LoRA on NF4 base"
    assert qlora["trainable_params"] == rows["lora"]["trainable_params"] == 2 * 8 * ((32 + 32) + (32 + 16))
    assert qlora["config"] == rows["lora"]["config"]
    assert not qlora["mergeable"] and qlora["inference_overhead_merged"] is None
    assert rows["lora"]["mergeable"] and rows["lora"]["inference_overhead_merged"] > 0
    quality = qlora["quality"]
    assert 0 <= quality["ci_low"] <= quality["mean"] <= quality["ci_high"] <= 1 and quality["n"] == 1
    assert qlora["eval_loss"]["mean"] > 0 and math.isfinite(qlora["eval_loss"]["mean"])
    assert qlora["peak_memory_bytes"] > 0 and qlora["median_step_s"] > 0 and qlora["tokens_per_s"] > 0
    assert qlora["latency_base_s"] > 0 and qlora["inference_overhead_unmerged"] > 0
    # its adapter is a plain PEFT LoRA checkpoint that loads on the full-precision base, where
    # it changes the outputs and computes what HF PEFT does with it (fp32: 1e-5)
    import peft
    from transformers import AutoModelForCausalLM

    folder = out / "adapters" / "qlora"
    assert qlora["adapter_path"] == str(folder)
    inputs = {"input_ids": torch.tensor([[6, 7, 8, 9, 10], [10, 9, 8, 7, 6]])}
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder).eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(folder))
    out_ours = logits(ours, inputs)
    assert differs(out_ours, logits(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), inputs))
    assert_close(logits(theirs.eval(), inputs), out_ours, atol=1e-5)


# ---- peftlab merge --quantize ----------------------------------------------------------------
def test_merge_cli_folds_into_the_dequantized_base_it_trained_on(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An adapter trained over NF4 merged with --quantize nf4 computes what the adapted NF4 model
    did (the fold is onto the weights it trained against); merged onto the fp32 base instead it
    is off by the quantization error."""
    from transformers import AutoModelForCausalLM

    from peftlab import cli
    from peftlab.models import load_causal_lm

    base, _ = load_causal_lm(str(tiny_llama), quantization="nf4")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=TASK)
    adapted = get_peft_model(base, config)
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[6, 7, 8, 9, 10, 11], [11, 10, 9, 8, 7, 6]])
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
    for flags, folder in ((["--quantize", "nf4"], "over-nf4"), ([], "over-fp32")):
        argv = ["merge", str(tiny_llama), str(tmp_path / "adapter"), str(tmp_path / folder), *flags]
        assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "folded into the de-quantized nf4 base" in printed.out
    assert printed.err == ""  # quiet: no loading bars or library warnings
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "over-nf4")
    assert not quantized.quantized_modules(merged) and merged.dtype == torch.float32
    assert getattr(merged.config, "quantization_config", None) is None
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "over-fp32")
    with torch.no_grad():
        err_nf4 = (merged(input_ids=ids).logits - want).abs().max().item()
        err_fp32 = (plain(input_ids=ids).logits - want).abs().max().item()
    assert err_nf4 < ATOL_4BIT  # the fold itself: float rounding only
    assert err_fp32 > 100 * err_nf4  # the NF4 grid the adapter trained on is not the fp32 base
    capsys.readouterr()  # (transformers' own loading bars above)
    # bad input: an unknown scheme, --double-quant alone (one line each, nothing written)
    for flags, message in (
        (["--quantize", "nf3"], "unknown scheme 'nf3'"),
        (["--double-quant"], "--double-quant goes with --quantize"),
    ):
        argv = ["merge", str(tiny_llama), str(tmp_path / "adapter"), str(tmp_path / "bad"), *flags]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_int8_cast_notice_is_not_logged_at_every_matmul(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    model = quantized_llama("int8")
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(**sample_inputs("llama"))
    assert not [r for r in caplog.records if "cast from" in r.getMessage()]
    # other bitsandbytes warnings still get through
    logging.getLogger("bitsandbytes.autograd._functions").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
