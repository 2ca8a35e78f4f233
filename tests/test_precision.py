"""Devices and mixed precision: ``--device`` / ``--dtype`` parsed and checked before anything
loads, adapters that keep a bf16 base's dtype, bf16 training on the CPU (autocast) against fp32
within stated tolerances, fp16 with a gradient scaler, the memory estimate of mixed precision,
merging in fp32, and on a GPU (skipped without one) the same with peak memory from
``torch.cuda.max_memory_allocated``.

bf16 tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); through the
two-layer tiny llama's matmuls and softmaxes the logits and the loss differ from fp32 by a few
tenths of a percent, so 2% on the loss and 5% (relative to the largest value) on outputs hold
with margin and still fail for a wrong dtype path (e.g. a base left in fp32 gives identical
values, which the first assertion in each test rules out).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftlab import BottleneckConfig, IA3Config, LoraConfig, TaskType, cli, get_peft_model
from peftlab.count import count_methods, load_preset
from peftlab.devices import Precision, native_bf16, parse_device, parse_dtype, resolve_device, resolve_dtype
from peftlab.training.encoding import Encoded
from peftlab.training.evaluation import evaluate_loss
from peftlab.training.loop import TrainConfig, TrainLoop
from test_training import save_tiny_causal_lm, tiny_llama

VOCAB = 53
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_and_dtype_values_are_checked() -> None:
    assert parse_device("CUDA:1") == "cuda:1"
    assert parse_dtype("bf16") == "bfloat16"
    with pytest.raises(ValueError, match=r"--device 'gpu': expected one of auto, cpu, cuda, cuda:N, mps"):
        parse_device("gpu")
    with pytest.raises(ValueError, match="--dtype 'int8': expected one of auto, float32, bfloat16, float16"):
        parse_dtype("int8")
    assert resolve_device("cpu") == torch.device("cpu")
    # auto: bfloat16 exactly where the CPU runs it natively
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"--device cuda: torch sees no CUDA GPU.*use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")
    # through every command line, before any model is touched (the model path does not even exist)
    nope = str(tmp_path / "nope")
    for argv in (
        ["train", "--model", nope, "--task", "topic", "--device", "cuda"],
        ["compare", "--model", nope, "--device", "cuda", "--out", str(tmp_path / "c")],
        ["serve", "--model", nope, "--device", "cuda"],
        ["demo", "--model", nope, "--device", "cuda"],
        ["merge", nope, nope, str(tmp_path / "m"), "--device", "cuda"],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "use --device cpu" in err[0], (argv, err)


def _adapted(config: object, vocab: int = VOCAB) -> torch.nn.Module:
    base = tiny_llama(vocab)  # seeded: the same weights as save_tiny_causal_lm's for its vocab
    torch.manual_seed(0)
    model = get_peft_model(base, config)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(k in name for k in ("lora_B", "ia3_l", "adapter_up")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


CONFIGS = {
    "lora": LoraConfig(r=4, task_type=TaskType.CAUSAL_LM),
    "ia3": IA3Config(task_type=TaskType.CAUSAL_LM),
    "bottleneck": BottleneckConfig(bottleneck_size=8, task_type=TaskType.CAUSAL_LM),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fp32_adapters_over_a_bf16_base_keep_its_dtype(method: str) -> None:
    model = _adapted(CONFIGS[method])
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    Precision(dtype=torch.bfloat16).prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    # without autocast: every frozen layer gets the bf16 it computes in (no silent promotion)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with Precision(dtype=torch.bfloat16).autocast():
            under = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and under.dtype == torch.bfloat16
    assert not torch.equal(out.float(), reference)
    scale = reference.abs().max()
    assert (out.float() - reference).abs().max() < 0.05 * scale
    assert (under.float() - reference).abs().max() < 0.05 * scale


def _data() -> list[Encoded]:
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(16):
        ids = torch.randint(3, VOCAB, (8 + i % 5,), generator=g).tolist()
        rows.append(Encoded(ids, [-100] * 3 + ids[3:]))
    return rows


def _train(dtype: torch.dtype, steps: int = 4, full: bool = False) -> tuple[TrainLoop, float]:
    torch.manual_seed(0)
    base = tiny_llama(VOCAB)
    model = (
        base.requires_grad_(True)
        if full
        else get_peft_model(base, LoraConfig(r=4, task_type=TaskType.CAUSAL_LM))
    )
    precision = Precision(dtype=dtype)
    precision.prepare(model)
    config = TrainConfig(steps=steps, batch_size=4, learning_rate=1e-3, seed=0)
    loop = TrainLoop(model, _data(), config, pad_token_id=0, precision=precision)
    loop.run(progress=False)
    return loop, evaluate_loss(model, _data(), pad_token_id=0, precision=precision)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_bf16_training_on_cpu_matches_fp32_within_tolerance(full: bool) -> None:
    fp32, fp32_eval = _train(torch.float32, full=full)
    bf16, bf16_eval = _train(torch.bfloat16, full=full)
    assert bf16.history.losses != fp32.history.losses  # it really ran in bf16
    for a, b in zip(bf16.history.losses, fp32.history.losses, strict=True):
        assert a == pytest.approx(b, rel=0.02)
    assert bf16_eval == pytest.approx(fp32_eval, rel=0.02)
    # what trains, its gradients and AdamW's state are fp32; the frozen base stays bf16
    assert all(p.dtype == torch.float32 for p in bf16.params)
    for state in bf16.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    frozen = [p for p in bf16.model.parameters() if not p.requires_grad]
    assert full or (frozen and all(p.dtype == torch.bfloat16 for p in frozen))


def test_fp16_uses_a_gradient_scaler_that_resumes() -> None:
    loop, _ = _train(torch.float16, steps=3)
    assert loop.scaler is not None
    state = loop.state_dict()
    assert state["grad_scaler"]["scale"] > 0
    assert all(torch.isfinite(torch.tensor(loop.history.losses)))
    again, _ = _train(torch.float16, steps=1)
    again.load_state_dict(state)
    assert again.scaler is not None and again.scaler.get_scale() == loop.scaler.get_scale()


def test_train_cli_in_bf16_records_its_precision(tmp_path: Path) -> None:
    model = save_tiny_causal_lm(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--task", "topic", "--steps", "2", "--batch-size", "4"]
    argv += [
        "--num-eval",
        "4",
        "--save-every",
        "0",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == {"device": "cpu", "dtype": "bfloat16"}
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_count_bf16_is_mixed_precision() -> None:
    report = count_methods(load_preset("smollm2-135m"), seq_len=128, batch_size=4)
    rows = {r.label: r for r in report.rows if r.error is None}
    full = next(r for r in rows.values() if r.peft_type is None)
    lora = next(r for r in rows.values() if r.peft_type == "LORA")
    # full fine-tuning: fp32 master weights and gradients in both precisions
    assert full.memory["bf16"].weights == full.memory["fp32"].weights == full.total * 4
    assert full.memory["bf16"].gradients == full.trainable * 4
    # adapters: the frozen base in bf16, the adapter itself in fp32
    assert lora.memory["bf16"].weights == (lora.total - lora.trainable) * 2 + lora.trainable * 4
    assert lora.memory["bf16"].activations < lora.memory["fp32"].activations


def test_merge_folds_in_fp32_and_casts_once(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftlab.merge import merge_to_folder

    base = save_tiny_causal_lm(tmp_path / "base")
    from test_training import tiny_tokenizer

    model = _adapted(LoraConfig(r=4, task_type=TaskType.CAUSAL_LM), vocab=len(tiny_tokenizer()))
    model.save_pretrained(tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()
    merge_to_folder(str(base), tmp_path / "adapter", tmp_path / "merged", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).state_dict()
    for name, value in expected.items():
        assert merged[name].dtype == torch.bfloat16
        # one rounding of the fp32 result, not a fold in bf16
        assert torch.equal(merged[name], value.to(torch.bfloat16)), name


@needs_cuda
def test_bf16_training_on_a_gpu_reports_its_peak_memory(tmp_path: Path) -> None:
    model = save_tiny_causal_lm(tmp_path / "model")
    out = tmp_path / "out"
    dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    argv = ["train", "--model", str(model), "--task", "topic", "--steps", "2", "--batch-size", "4"]
    argv += ["--num-eval", "4", "--save-every", "0", "--dtype", dtype, "--device", "cuda", "--out", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"]["device"] == "cuda:0"
    assert metrics["peak_gpu_memory_bytes"] > 0


@needs_cuda
def test_gpu_mixed_precision_matches_fp32() -> None:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    model = _adapted(CONFIGS["lora"]).cuda()
    with torch.no_grad():
        reference = model(input_ids=ids.cuda()).logits.float()
        precision = Precision(torch.device("cuda", 0), torch.bfloat16)
        precision.prepare(model)
        with precision.autocast():
            out = model(input_ids=ids.cuda()).logits.float()
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
