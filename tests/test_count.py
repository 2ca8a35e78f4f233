"""``peftlab count``: exact counts on meta models, equal to HF PEFT's; memory arithmetic; CLI."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from conftest import build_model
from peftlab import IA3Config, LoraConfig, TaskType, get_peft_model
from peftlab.cli import main
from peftlab.count import (
    CountReport,
    CountRow,
    build_meta_model,
    count_methods,
    load_preset,
    model_class,
    model_config,
    preset_names,
)
from peftlab.presets import PRESETS, MethodPreset
from peftlab.training.memory import ADAMW_STATE_BYTES

METHOD_ROWS = tuple(PRESETS.values())

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def row(report: CountReport, label: str) -> CountRow:
    return next(r for r in report.rows if r.label == label)


def hf_peft_counts(data: dict[str, Any], peft_config: Any, task: TaskType | None = None) -> tuple[int, int]:
    """HF PEFT's (trainable, total) for ``peft_config`` on the same meta model peftlab builds."""
    import peft

    config = model_config(data)
    cls, _ = model_class(config, task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build_meta_model(config, cls), peft_config)
    return model.get_nb_trainable_parameters()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def mistral() -> CountReport:
    return count_methods(load_preset("mistral-7b"), label="mistral-7b")


# ---- exact counts --------------------------------------------------------------------------
def test_presets_are_the_published_models() -> None:
    assert preset_names() == ["bert-base", "llama-2-7b", "mistral-7b", "smollm2-135m", "t5-base"]
    totals = {
        "mistral-7b": 7_241_732_096,
        "llama-2-7b": 6_738_415_616,
        "smollm2-135m": 134_515_008,
        "t5-base": 222_903_552,
        "bert-base": 109_514_298,  # BertForMaskedLM, decoder tied to the word embeddings
    }
    for name, total in totals.items():
        data = load_preset(name)
        assert {"model_type", "architectures"} <= data.keys()
        full = count_methods(data, rows=METHOD_ROWS[:1]).rows[0]
        assert (full.trainable, full.total) == (total, total), name


def test_mistral_lora_qv_is_exact(mistral: CountReport) -> None:
    lora = row(mistral, "LoRA (r=8, q+v)")
    # grouped-query attention: v_proj is 4096 -> 1024, so 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert lora.trainable == 3_407_872
    assert lora.targets == ["q_proj", "v_proj"] and lora.adapted_modules == 64
    line = "trainable params: 3,407,872 || all params: 7,245,139,968 || trainable%: 0.0470"
    assert lora.trainable_line() == line
    # the same line the library prints for the same model
    config = model_config(load_preset("mistral-7b"))
    model = get_peft_model(build_meta_model(config, model_class(config)[0]), LoraConfig(r=8, lora_alpha=16))
    out = io.StringIO()
    with redirect_stdout(out):
        model.print_trainable_parameters()
    assert out.getvalue().strip() == line


def test_model_is_built_on_meta_device() -> None:
    config = model_config(load_preset("llama-2-7b"))
    model = build_meta_model(config, model_class(config)[0])
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_70b_config_counts_without_weights() -> None:
    # would need ~276 GB in fp32 if anything were allocated; on the meta device it takes seconds
    report = count_methods(LLAMA_70B, label="llama-70b")
    assert row(report, "Full fine-tuning").total == 68_976_648_192
    # 80 layers * 8 * ((8192 + 8192) + (8192 + 1024))
    assert row(report, "LoRA (r=8, q+v)").trainable == 80 * 8 * (16384 + 9216)
    # IA3: k and v outputs (1024 each) and down_proj's input (28672) per layer
    assert row(report, "IA3").trainable == 80 * (1024 + 1024 + 28672)


HF_ROWS: list[tuple[str, Callable[[Any], Any]]] = [
    ("LoRA (r=8, q+v)", lambda t: _peft().LoraConfig(r=8, lora_alpha=16, task_type=t)),
    (
        "LoRA (r=16, all-linear)",
        lambda t: _peft().LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type=t),
    ),
    ("IA3", lambda t: _peft().IA3Config(task_type=t)),
]


def _peft() -> Any:
    import peft

    return peft


@pytest.mark.parametrize("preset", ["mistral-7b", "llama-2-7b"])
def test_counts_equal_hf_peft_on_presets(preset: str) -> None:
    data = load_preset(preset)
    report = count_methods(data)
    peft = _peft()
    explicit = {
        "LoRA (r=8, q+v)": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "LoRA (r=16, all-linear)": peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        "IA3": peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    }
    for label, peft_config in explicit.items():
        ours = row(report, label)
        assert (ours.trainable, ours.total) == hf_peft_counts(data, peft_config), label


# the head each tiny model is counted with, and the PEFT task type that matches it
TINY_TASKS = {
    "llama": TaskType.CAUSAL_LM,
    "gpt2": TaskType.CAUSAL_LM,
    "bert": TaskType.SEQ_CLS,  # PEFT trains the classifier in full; so must we
    "t5": TaskType.SEQ_2_SEQ_LM,
    "bart": TaskType.SEQ_2_SEQ_LM,
}


def test_counts_equal_hf_peft_on_tiny_models(arch: str) -> None:
    """Architecture defaults (target_modules=None) on both sides: the same modules, the same counts."""
    data = build_model(arch).config.to_dict()
    task = TINY_TASKS[arch]
    report = count_methods(data, task=task)
    assert report.task_type == task
    for label, make in HF_ROWS:
        ours = row(report, label)
        assert ours.error is None, ours.error
        assert (ours.trainable, ours.total) == hf_peft_counts(data, make(task.value), task), (arch, label)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_prefix_rows_show_the_attention_layers_they_enter(arch: str) -> None:
    data = build_model(arch).config.to_dict()
    prefix = row(count_methods(data, task=TINY_TASKS[arch]), "Prefix tuning")
    assert prefix.error is None, prefix.error
    # two layers; encoder-decoder models get PEFT's layout: the decoder's self-attention only
    assert prefix.adapted_modules == 2
    assert prefix.targets == {"llama": ["self_attn"], "gpt2": ["attn"], "t5": ["SelfAttention"]}.get(
        arch, ["self_attn"]
    )
    assert any(
        line.startswith("| Prefix tuning") and line.rstrip(" |").endswith("2")
        for line in count_methods(data, task=TINY_TASKS[arch]).render().splitlines()
    )


def test_seq_cls_head_is_trainable() -> None:
    data = build_model("bert").config.to_dict()
    report = count_methods(data, task=TaskType.SEQ_CLS)
    ia3 = row(report, "IA3")
    head = 32 * 3 + 3  # classifier: hidden 32 -> 3 labels, trained in full as a copy
    vectors = 2 * (32 + 32 + 32 + 64)  # per layer: key, value, attention.output.dense out, output.dense in
    assert ia3.trainable == head + vectors
    assert ia3.total == row(report, "Full fine-tuning").total + head + vectors


# ---- memory arithmetic ---------------------------------------------------------------------
def test_memory_estimates_follow_the_stated_formula(mistral: CountReport) -> None:
    lora = row(mistral, "LoRA (r=8, q+v)")
    a = mistral.activations
    assert (a.batch_size, a.seq_len, a.num_layers, a.hidden_size, a.output_size) == (1, 512, 32, 4096, 32000)
    # the chunked head: two chunks of min(b*s, 4M // V) positions of fp32 logits
    head = 2 * min(512, 4 * 2**20 // 32000) * 32000 * 4
    acts16 = 32 * 512 * 4096 * 34 + head
    acts32 = 2 * 32 * 512 * 4096 * 34 + head
    bf16, fp32 = lora.memory["bf16"], lora.memory["fp32"]
    # bf16 is mixed precision: frozen weights bf16, the adapter and its gradients fp32
    assert (bf16.weights, bf16.gradients, bf16.optimizer, bf16.activations) == (
        (lora.total - lora.trainable) * 2 + lora.trainable * 4,
        lora.trainable * 4,
        lora.trainable * ADAMW_STATE_BYTES,
        acts16,
    )
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.activations) == (
        lora.total * 4,
        lora.trainable * 4,
        lora.trainable * 8,
        acts32,
    )
    assert fp32.total == fp32.weights + fp32.gradients + fp32.optimizer + fp32.activations
    full = row(mistral, "Full fine-tuning").memory["bf16"]
    # full fine-tuning: fp32 master weights and gradients
    assert full.gradients == 7_241_732_096 * 4 and full.optimizer == 7_241_732_096 * 8
    assert full.weights == 7_241_732_096 * 4


def test_activations_scale_with_batch_and_seq_len() -> None:
    data = load_preset("smollm2-135m")
    small = count_methods(data, rows=METHOD_ROWS[:1], batch_size=1, seq_len=64).rows[0]
    big = count_methods(data, rows=METHOD_ROWS[:1], batch_size=4, seq_len=128).rows[0]
    # the layers' activations scale with b*s; the chunked head's logits are capped at one chunk
    head = 2 * min(64, 4 * 2**20 // 49152) * 49152 * 4
    big_head = 2 * min(512, 4 * 2**20 // 49152) * 49152 * 4
    assert big.memory["fp32"].activations - big_head == 8 * (small.memory["fp32"].activations - head)
    assert big.memory["fp32"].weights == small.memory["fp32"].weights


def test_encoder_decoder_counts_both_stacks() -> None:
    report = count_methods(load_preset("t5-base"), rows=METHOD_ROWS[:1])
    assert report.activations.num_layers == 24 and report.activations.hidden_size == 768


# ---- the row frame -------------------------------------------------------------------------
def test_rows_extend_with_one_preset_and_bad_rows_are_reported() -> None:
    data = build_model("llama").config.to_dict()
    rows = [
        *METHOD_ROWS,
        MethodPreset(
            "lora-qkvo",
            "LoRA r=4 (q,k,v,o)",
            lambda c, t: LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            1e-3,
            1e-3,
        ),
        MethodPreset(
            "ia3-missing",
            "IA3 on a missing module",
            lambda c, t: IA3Config(target_modules=["no_such_proj"]),
            1e-3,
            1e-3,
        ),
    ]
    report = count_methods(data, rows=rows)
    extra = row(report, "LoRA r=4 (q,k,v,o)")
    # 2 layers; q,o: 32 -> 32; k,v: 32 -> 16 (GQA)
    assert extra.trainable == 2 * 4 * (64 + 64 + 48 + 48)
    bad = row(report, "IA3 on a missing module")
    assert bad.error is not None and "no_such_proj" in bad.error and "q_proj" in bad.error
    text = report.render()
    assert "Not applicable to this model" in text and "IA3 on a missing module" in text


# ---- command line --------------------------------------------------------------------------
def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", "--preset", "mistral-7b", "--batch-size", "2", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    lora = next(line for line in lines if line.startswith("| LoRA (r=8, q+v)"))
    assert "3,407,872" in lora and "7,245,139,968" in lora and "0.0470" in lora
    for label in ("Full fine-tuning", "LoRA (r=16, all-linear)", "IA3"):
        assert any(line.startswith(f"| {label}") for line in lines), label
    assert "Training memory estimate, fp32" in out and "Training memory estimate, bf16" in out
    assert "b=2, seq len s=256" in out and "Korthikanti" in out


def test_cli_json_and_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(load_preset("smollm2-135m")))
    assert main(["count", "--config", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_type"] == "llama" and data["assumptions"]["seq_len"] == 512
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["LoRA (r=8, q+v)"]["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))
    assert rows["IA3"]["memory_bytes"]["bf16"]["optimizer"] == rows["IA3"]["trainable_params"] * 8
    # a folder holding config.json works too
    assert main(["count", "--config", str(tmp_path), "--json"]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an object"),
        ('{"hidden_size": 8}', "no 'model_type'"),
        ('{"model_type": "no-such-model"}', "model_type 'no-such-model' is not known"),
    ],
)
def test_cli_bad_config_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    assert main(["count", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("peftlab count: error:")


def test_cli_missing_file_and_bad_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    assert main(["count", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope.json" in err

    assert main(["count", "--preset", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'gpt-5'" in err
    assert all(name in err for name in preset_names())

    assert main(["count"]) == 2
    assert "--preset" in capsys.readouterr().err
