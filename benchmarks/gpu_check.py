"""Every GPU path of peftlab in one process, in under 8 minutes on one GPU, one JSON file out.

    python benchmarks/gpu_check.py --json gpu.json                     # on a GPU (cuda, bfloat16)
    python benchmarks/gpu_check.py --device cpu --tiny --json cpu.json # smoke run, about a minute

Five parts, each timed on its own and each allowed to fail without losing the others' figures
(the exception is written into its part of the JSON and the exit status becomes 1):

1. ``train_memory``: a few training steps of each method (full, LoRA, IA3, bottleneck, prefix;
   the presets ``peftlab compare`` runs) through peftlab's own loop in mixed precision, with
   ``torch.cuda.max_memory_allocated`` over the steps beside ``peftlab count``'s estimate for the
   same batch, length and precision (:mod:`peftlab.training.memory`, as ``peftlab compare`` puts
   it beside its peak). The peak also holds what was allocated on the GPU before the model came
   (the baseline: the CUDA workspace, leftovers of earlier steps), which the estimate does not
   model, so the ratio judged is peak / (estimate + baseline).
2. ``mixed_decode``: ``generate`` over one batch whose rows use K = 1, 8 and 32 distinct LoRA
   adapters (``adapter_names=``), timed as ``benchmarks/mixed_batch.py`` times it.
3. ``compare``: ``peftlab compare --quick --methods lora,ia3`` on the device, in this process.
4. ``serve``: a ``peftlab serve`` process on the device with adapters of all four methods and a
   few streamed requests for each of them and the base (``benchmarks/serve_load.py``'s load).
5. ``memory_plan``: ``peftlab compare --quick --methods lora,full --max-memory`` at 12 bytes per
   base parameter (on CUDA a hard cap): full fine-tuning does not fit, LoRA trains.

Targets (one ``PASS`` / ``MISS`` / ``SKIP`` line each; exit status 3 when one is missed, see
``targets.py``): for each method, CUDA peak / (count's estimate + baseline) within 1.00 +- 0.15
(``SKIP`` on the CPU: no CUDA peak there); decode K=8 / K=1 <= 1.25 (``mixed_batch.py``'s
flatness target); ``peftlab compare --quick`` finished; every serve request answered; under
``--max-memory`` full fine-tuning is reported as not fitting and LoRA trains.

``--tiny`` swaps SmolLM2-135M for a randomly initialised two-layer llama with a byte-level
tokenizer (built into a temporary folder, nothing downloaded) and takes the smallest settings
everywhere, so the whole check runs on a CPU in about a minute: its figures mean nothing, it
shows that every path still runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mixed_batch
import serve_load
from peftlab.cli import main as peftlab_main
from peftlab.core.peft_model import PeftModel, count_parameters, get_peft_model
from peftlab.devices import Precision, peak_memory
from peftlab.methods.lora import LoraConfig
from peftlab.models import load_causal_lm
from peftlab.presets import PRESETS, MethodPreset
from peftlab.training.encoding import Encoded
from peftlab.training.loop import TrainConfig, train
from peftlab.training.memory import MemoryEstimate, activation_assumption, memory_estimates
from targets import Targets

TRAIN_METHODS = ("full", "lora", "ia3", "bottleneck", "prefix")
PEAK_TOLERANCE = 0.15  # CUDA peak within 15% of count's estimate plus the baseline
DECODE_KS = (1, 8, 32)
COMPARE_METHODS = "lora,ia3"
SERVED_BASE = "base"  # --served-model-name: the same request name whatever the model
SERVER_START_S = 300
MIB = 1024**2


@dataclass(frozen=True)
class Sizes:
    """The shapes and counts of a run: :data:`GPU_SIZES`, or ``--tiny``'s :data:`TINY_SIZES`."""

    train_batch: int
    train_seq: int
    train_steps: int
    decode_batch: int  # at least max(DECODE_KS), so a K=32 batch holds 32 adapters
    decode_tokens: int
    decode_repeats: int
    serve_requests: int
    serve_rate: float  # requests per second, Poisson arrivals
    serve_max_tokens: tuple[int, ...]


GPU_SIZES = Sizes(8, 512, 3, 32, 16, 3, 24, 8.0, (16, 32, 64))
TINY_SIZES = Sizes(2, 32, 1, 32, 2, 1, 6, 20.0, (4, 8))


@dataclass
class Run:
    """What every part shares: where and how it runs, and the base model it copies."""

    precision: Precision
    sizes: Sizes
    model: str | None  # --model for the CLI parts; None: the embedded SmolLM2-135M
    base: nn.Module  # fp32, on the CPU: each part copies it to where it runs
    tokenizer: Any
    tmp: Path


# ---- the base models -----------------------------------------------------------------------
def save_tiny_llama(folder: Path) -> Path:
    """A randomly initialised two-layer llama (as tests/conftest.py's ``tiny_llama``) with a
    byte-level tokenizer instead of a word list: any prompt of the compare task or of the serve
    load encodes without unknown tokens. Positions reach 1024 because bytes make long prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>").save_pretrained(
        folder
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def free_device_memory(device: torch.device) -> None:
    """Drop what the last step left, so the next one's baseline and peak are its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 1. training memory against peftlab count -------------------------------------------------
def training_rows(run: Run) -> list[Encoded]:
    """Rows of exactly ``train_seq`` random tokens, every token supervised: the shapes count's
    estimate assumes (the chunked head at its widest)."""
    s, vocab = run.sizes, int(run.base.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(2, vocab, (s.train_batch * s.train_steps, s.train_seq), generator=g).tolist()
    return [Encoded(ids, ids) for ids in rows]


def adapted_copy(run: Run, preset: MethodPreset) -> nn.Module:
    """A fresh copy of the base with the preset's adapter, or every weight trainable (full)."""
    torch.manual_seed(0)
    model = copy.deepcopy(run.base)
    config = preset.config(model.config)
    if config is None:
        return model.requires_grad_(True)
    return get_peft_model(model, config)


def count_estimate(run: Run, trainable: int, total: int) -> MemoryEstimate:
    """``peftlab count``'s estimate at this run's batch, length and precision (as
    ``peftlab.compare.measure`` builds it)."""
    acts = activation_assumption(run.base.config, run.base, run.sizes.train_batch, run.sizes.train_seq)
    return memory_estimates(trainable, total, acts)["bf16" if run.precision.mixed else "fp32"]


def train_one(run: Run, preset: MethodPreset, rows: list[Encoded]) -> dict[str, Any]:
    """Train ``preset`` for a few steps; its peak beside the estimate (None off CUDA)."""
    device = run.precision.device
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    model = run.precision.prepare(adapted_copy(run, preset))
    trainable, total = count_parameters(model)
    estimate = count_estimate(run, trainable, total)
    s = run.sizes
    config = TrainConfig(
        steps=s.train_steps,
        batch_size=s.train_batch,
        learning_rate=preset.learning_rate,
        max_length=s.train_seq,
        seed=0,
    )
    pad = int(run.tokenizer.pad_token_id)
    with peak_memory(device) as peak:
        history = train(model, rows, config, pad_token_id=pad, progress=False, precision=run.precision)
    del model
    free_device_memory(device)
    figures: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "estimate_bytes": estimate.to_dict(),
        "baseline_bytes": baseline,
        "peak_bytes": peak["peak_bytes"],
        "ratio": None,
        "median_step_s": statistics.median(history.step_times),
        "last_loss": history.losses[-1],
    }
    if peak["peak_bytes"] is not None and baseline is not None:
        figures["ratio"] = peak["peak_bytes"] / (estimate.total + baseline)
    return figures


def part_train_memory(run: Run, out: dict[str, Any]) -> None:
    """Part 1: each method's CUDA peak beside count's estimate."""
    s = run.sizes
    out.update(
        batch_size=s.train_batch,
        seq_len=s.train_seq,
        steps=s.train_steps,
        precision=run.precision.describe(),
        methods={},
    )
    rows = training_rows(run)
    for name in TRAIN_METHODS:  # filled in as they finish: a later failure keeps the earlier figures
        out["methods"][name] = train_one(run, PRESETS[name], rows)


# ---- 2. mixed-adapter decode -----------------------------------------------------------------
def routed_model(run: Run) -> PeftModel:
    """The base with max(K) LoRA adapters (``lora0``..., mixed_batch.py's names and shape), on
    the device in the run's dtype."""
    model = PeftModel(copy.deepcopy(run.base))
    torch.manual_seed(0)
    for i in range(max(DECODE_KS)):
        model.add_adapter(f"lora{i}", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
    model.set_adapter("lora0")
    return model.to(device=run.precision.device, dtype=run.precision.dtype).eval()


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` that returns only once the device is done, so a timer around it sees the work."""

    def run() -> Any:
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return run


def part_mixed_decode(run: Run, out: dict[str, Any]) -> None:
    """Part 2: decode cost against the number K of distinct adapters in the batch."""
    s, device = run.sizes, run.precision.device
    out.update(
        batch=s.decode_batch,
        context=mixed_batch.CONTEXT,
        decode_tokens=s.decode_tokens,
        repeats=s.decode_repeats,
        ks={},
        ratios={},
    )
    model = routed_model(run)
    g = torch.Generator().manual_seed(0)
    context = torch.randint(
        10, int(run.base.config.vocab_size), (s.decode_batch, mixed_batch.CONTEXT), generator=g
    ).to(device)
    table = {f"K={k}": (model, mixed_batch.lora_names(k, s.decode_batch), lambda: None) for k in DECODE_KS}
    times = mixed_batch.measure(
        table,
        lambda m, names: synced(mixed_batch.decode(m, context, names, s.decode_tokens), device),
        s.decode_repeats,
    )
    for name, values in times.items():
        median = statistics.median(values)
        out["ks"][name] = {
            "times_s": values,
            "ms_per_token": 1e3 * median / s.decode_tokens,
            "tokens_per_s": s.decode_batch * s.decode_tokens / median,
        }
    for k in DECODE_KS[1:]:
        value, p25, p75 = mixed_batch.paired(times, f"K={k}", "K=1")
        out["ratios"][f"K={k} / K=1"] = {"value": value, "p25": p25, "p75": p75}


# ---- 3. peftlab compare --quick ----------------------------------------------------------------
def write_retain_text(path: Path) -> Path:
    """Prose of our own for compare's forgetting measure, so the run needs no download."""
    sentences = serve_load.SENTENCES
    passages = [" ".join(sentences[i:] + sentences[:i]) for i in range(0, len(sentences), 2)]
    path.write_text("\n\n".join(passages) + "\n", encoding="utf-8")
    return path


def compare_row(row: dict[str, Any]) -> dict[str, Any]:
    """The figures of one method's row of compare's results.json worth keeping here."""
    peaks = [r.get("peak_gpu_memory_bytes") for r in row.get("runs", [])]
    return {
        "quality": (row.get("quality") or {}).get("mean"),
        "median_step_s": row.get("median_step_s"),
        "peak_gpu_memory_bytes": max((p for p in peaks if p), default=None),
        "estimated_train_memory_bytes": (row.get("estimated_train_memory_bytes") or {}).get("total"),
    }


def part_compare(run: Run, out: dict[str, Any]) -> None:
    """Part 3: ``peftlab compare --quick`` end to end on the device, in this process."""
    folder = run.tmp / "compare"
    retain = write_retain_text(run.tmp / "retain.txt")
    argv = ["compare", "--quick", "--device", str(run.precision.device), "--dtype", run.precision.dtype_name,
            "--methods", COMPARE_METHODS, "--out", str(folder), "--retain-data", str(retain)]  # fmt: skip
    if run.model is not None:
        argv += ["--model", run.model]
    out.update(command="peftlab " + " ".join(argv), exit_status=None, finished=False)
    out["exit_status"] = peftlab_main(argv)
    results = folder / "results.json"
    out["finished"] = out["exit_status"] == 0 and results.is_file()
    if results.is_file():
        rows = json.loads(results.read_text())["methods"]
        out["methods"] = {row["method"]: compare_row(row) for row in rows}
    if not out["finished"]:
        raise RuntimeError(f"peftlab compare exited with status {out['exit_status']}")


def memory_limit(run: Run, argv: list[str]) -> tuple[float, bool]:
    """(``--max-memory`` in GiB, whether full fine-tuning is expected not to fit): between LoRA's
    estimate at the whole batch and the least full fine-tuning needs (one example at a time with
    checkpointing) where there is room between them, else 0.9x full fine-tuning's estimate at
    the whole batch (it then trains in micro-batches). The estimates are the comparison's own
    (its lengths come from the data)."""
    from peftlab.cli import build_parser
    from peftlab.cli.compare import options_from_args
    from peftlab.compare.inputs import load_inputs
    from peftlab.compare.memory_plan import ComparisonPlans
    from peftlab.compare.options import resolve_options
    from peftlab.compare.session import SharedBase

    args = build_parser().parse_args(argv)
    args.argv = argv
    inputs = load_inputs(resolve_options(options_from_args(args)))
    plans = ComparisonPlans(SharedBase(inputs), None)
    batch = inputs.sizes.batch_size
    lora = plans.planner(PRESETS["lora"], budget=0).estimate(batch, False)
    full = plans.planner(PRESETS["full"], budget=0)
    least = full.smallest().needed_bytes
    del inputs, plans
    if lora < least:
        return (lora + least) / 2 / 1024**3, True
    return 0.9 * full.estimate(batch, False) / 1024**3, False


def part_memory_plan(run: Run, out: dict[str, Any]) -> None:
    """Part 5: ``compare --quick --methods lora,full --max-memory`` below full fine-tuning's
    estimate (:func:`memory_limit`; on CUDA a hard cap for PyTorch's allocator, lifted again
    afterwards): full fine-tuning is reported as not fitting (or trains in micro-batches where
    the limit must leave it room), LoRA trains."""
    folder = run.tmp / "memory-plan"
    argv = ["compare", "--quick", "--device", str(run.precision.device), "--dtype", run.precision.dtype_name,
            "--methods", "lora,full", "--out", str(folder), "--retain-data", "none"]  # fmt: skip
    if run.model is not None:
        argv += ["--model", run.model]
    limit, full_unfit = memory_limit(run, argv)
    argv += ["--max-memory", f"{limit:.6g}"]
    out.update(command="peftlab " + " ".join(argv), max_memory_gib=limit, full_expected_to_fit=not full_unfit)
    try:
        out["exit_status"] = peftlab_main(argv)
    finally:
        if run.precision.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, run.precision.device)
    results = folder / "results.json"
    if out["exit_status"] != 0 or not results.is_file():
        raise RuntimeError(f"peftlab compare --max-memory exited with status {out['exit_status']}")
    data = json.loads(results.read_text())
    out["trained"] = {
        row["method"]: {**compare_row(row), "plan": row["memory_plan"]} for row in data["methods"]
    }
    out["did_not_fit"] = {u["method"]: u["reason"] for u in data["did_not_fit"]}


# ---- 4. peftlab serve under load ---------------------------------------------------------------
def save_adapters(run: Run, root: Path) -> dict[str, Path]:
    """serve_load.py's adapters (all four methods, moved away from identity so they change the
    output) on this run's base, each saved in its own folder."""
    folders = {}
    for seed, (name, config) in enumerate(serve_load.adapter_configs().items()):
        model = get_peft_model(copy.deepcopy(run.base), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.adapter_parameters("default").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def server_command(run: Run, folders: dict[str, Path], port: int) -> list[str]:
    """``peftlab serve`` on the run's device and dtype (continuous batching, its default), the base
    requested as :data:`SERVED_BASE`."""
    cmd = [sys.executable, "-m", "peftlab", "serve", "--port", str(port), "--served-model-name", SERVED_BASE,
           "--device", str(run.precision.device), "--dtype", run.precision.dtype_name,
           "--log-level", "warning"]  # fmt: skip
    if run.model is not None:
        cmd += ["--model", run.model]
    for name, folder in folders.items():
        cmd += ["--adapter", f"{name}={folder}"]
    return cmd


def wait_until_up(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Return once ``/health`` answers; a server that exits or never answers is an error."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peftlab serve exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if serve_load.call(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"peftlab serve did not come up within {SERVER_START_S} s: {log.read_text()[-3000:]}")


def part_serve(run: Run, out: dict[str, Any]) -> None:
    """Part 4: a served mix of requests for the base and an adapter of each method."""
    s = run.sizes
    folders = save_adapters(run, run.tmp / "adapters")
    models = [SERVED_BASE, *folders]
    requests = serve_load.workload(s.serve_rate, s.serve_requests, models, 0, list(s.serve_max_tokens))
    for i, request in enumerate(requests):  # round robin, so every adapter is asked at least once
        request["model"] = models[i % len(models)]
    out.update(models=models, requests=len(requests), rate=s.serve_rate)
    port, log = serve_load.free_port(), run.tmp / "serve.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(server_command(run, folders, port), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until_up(proc, port, log)
        warm_up = {"model": SERVED_BASE, "prompt": serve_load.SENTENCES[0], "max_tokens": 2, "stream": True}
        serve_load.streamed(port, warm_up)  # the first request pays for lazy set-up: not measured
        results, stats = serve_load.run_load(port, requests)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    summary = serve_load.summary(results, stats)
    del summary["texts"]  # random text from random adapters: nothing to read in it
    summary["load_wall_s"] = summary.pop("wall_s")  # the part's own wall time is "wall_s"
    out.update(summary)


# ---- the run ---------------------------------------------------------------------------------
PARTS: dict[str, Callable[[Run, dict[str, Any]], None]] = {
    "train_memory": part_train_memory,
    "mixed_decode": part_mixed_decode,
    "compare": part_compare,
    "serve": part_serve,
    "memory_plan": part_memory_plan,
}


def run_part(name: str, part: Callable[[Run, dict[str, Any]], None], run: Run) -> dict[str, Any]:
    """One part's figures, its wall time and its error (None when it finished): a failure is
    recorded, not raised, so the parts after it still run."""
    out: dict[str, Any] = {"wall_s": None, "error": None}
    print(f"-- {name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        part(run, out)
    except Exception:
        out["error"] = traceback.format_exc()
        print(f"{name} failed:\n{out['error']}", file=sys.stderr, flush=True)
    finally:
        free_device_memory(run.precision.device)
    out["wall_s"] = round(time.perf_counter() - start, 2)
    return out


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def render_training(train: dict[str, Any]) -> list[str]:
    lines = [
        f"#### training memory ({train['precision']}, batch {train['batch_size']} x {train['seq_len']}, "
        f"{train['steps']} steps)",
        "",
        "| method | trainable | CUDA peak MiB | count's estimate MiB | baseline MiB "
        "| peak / (estimate + baseline) | step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in train.get("methods", {}).items():
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.3f}"
        lines.append(
            f"| {name} | {m['trainable_params']:,d} | {mib(m['peak_bytes'])} | "
            f"{mib(m['estimate_bytes']['total'])} | {mib(m['baseline_bytes'])} | {ratio} | "
            f"{m['median_step_s']:.3f} |"
        )
    return [*lines, ""]


def render_decode(decode: dict[str, Any]) -> list[str]:
    lines = [
        f"#### mixed-adapter decode (batch {decode['batch']}, {decode['decode_tokens']} tokens after "
        f"{decode['context']}, median of {decode['repeats']})",
        "",
        "| K | ms per token | tokens/s |",
        "|---|---:|---:|",
    ]
    for name, k in decode["ks"].items():
        lines.append(f"| {name} | {k['ms_per_token']:.2f} | {k['tokens_per_s']:.0f} |")
    lines.append("")
    for name, r in decode["ratios"].items():
        lines.append(f"{name}: {r['value']:.3f} (p25-p75 {r['p25']:.3f}-{r['p75']:.3f})")
    return [*lines, ""]


def render_report(parts: dict[str, dict[str, Any]]) -> str:
    """The figures as Markdown, part by part (what a part measured before it failed included)."""
    walls = ", ".join(f"{name} {part['wall_s']} s" for name, part in parts.items())
    lines = [f"wall time of each part: {walls}", ""]
    if parts["train_memory"].get("methods"):
        lines += render_training(parts["train_memory"])
    if parts["mixed_decode"].get("ks"):
        lines += render_decode(parts["mixed_decode"])
    lines.append(f"compare: exit status {parts['compare'].get('exit_status')}")
    serve = parts["serve"]
    if "ok" in serve:
        lines.append(
            f"serve: {serve['ok']} / {serve['sent']} answered, {serve['requests_per_s']} req/s, "
            f"{serve['tokens_per_s']} generated tok/s, TTFT p50 {serve['ttft_ms']['p50']} ms"
        )
    plan = parts["memory_plan"]
    if "trained" in plan:
        trained = ", ".join(f"{m} {r['plan']['shown']}" for m, r in plan["trained"].items())
        lines.append(
            f"--max-memory {plan['max_memory_gib']:.3g} GiB: trained {trained}; "
            + "; ".join(f"{m} {reason}" for m, reason in plan["did_not_fit"].items())
        )
    return "\n".join(lines) + "\n"


def check_targets(parts: dict[str, dict[str, Any]]) -> Targets:
    """One verdict per target; a target its part failed to reach is a SKIP (the part's error is
    in the JSON, and the exit status is 1 anyway)."""
    targets = Targets()
    failed = "its part failed before it (the error is in the JSON)"
    methods = parts["train_memory"].get("methods", {})
    for name in TRAIN_METHODS:
        target = f"{name}: CUDA peak / (count's estimate + baseline)"
        if name not in methods:
            targets.skip(target, failed)
        elif methods[name]["ratio"] is None:
            targets.skip(target, "no CUDA peak off a CUDA device")
        else:
            ratio = methods[name]["ratio"]
            targets.check(target, ratio, abs(ratio - 1) <= PEAK_TOLERANCE, f"1.00 +- {PEAK_TOLERANCE:.2f}")
    flat = parts["mixed_decode"].get("ratios", {}).get("K=8 / K=1")
    if flat is None:
        targets.skip("decode K=8 / K=1", failed)
    else:
        targets.at_most("decode K=8 / K=1", flat["value"], mixed_batch.TARGET_FLAT)
    finished = bool(parts["compare"].get("finished"))
    targets.check("peftlab compare --quick finished", "yes" if finished else "no", finished, "yes")
    serve = parts["serve"]
    if "sent" not in serve:
        targets.skip("serve requests answered", failed)
    else:
        sent = serve["sent"]
        targets.check(
            "serve requests answered", f"{serve['ok']} / {sent}", serve["ok"] == sent > 0, f"{sent} / {sent}"
        )
    plan = parts["memory_plan"]
    name = "compare --max-memory below full FT's estimate: lora trains, full does not fit or accumulates"
    if "trained" not in plan:
        targets.skip(name, failed)
    else:
        trained, unfit = plan["trained"], plan["did_not_fit"]
        if plan["full_expected_to_fit"]:
            ok = (
                "full" in trained
                and trained["full"]["plan"]["micro_batch"] < trained["full"]["plan"]["batch_size"]
            )
        else:
            ok = list(unfit) == ["full"]
        ok = ok and "lora" in trained
        shown = f"trained {sorted(trained)}, did not fit {sorted(unfit)}"
        targets.check(name, shown, ok, "lora trains; full as expected")
    return targets


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Where the figures were measured."""
    precision = args.precision
    device = precision.device
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "dtype": precision.dtype_name,
        "model": "tiny llama (random, byte-level tokenizer)" if args.tiny else "SmolLM2-135M",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where every part runs (default: cuda when available)",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="training precision and inference weights (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random llama and the smallest settings: the CPU smoke run (about a minute)",
    )
    p.add_argument("--json", default=None, help="write the figures, errors and verdicts here")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    try:
        args.precision = Precision.resolve(args.device, args.dtype)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the serve process loads local files only: no hub
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model = str(save_tiny_llama(Path(tmp) / "tiny-llama")) if args.tiny else None
        base, tokenizer = load_causal_lm(model)
        sizes = TINY_SIZES if args.tiny else GPU_SIZES
        run = Run(args.precision, sizes, model, base, tokenizer, Path(tmp))
        parts = {name: run_part(name, part, run) for name, part in PARTS.items()}
    print("\n" + render_report(parts), flush=True)
    targets = check_targets(parts)
    wall = round(time.perf_counter() - started, 1)
    print(f"wall time {wall} s", flush=True)
    if args.json:
        result = {
            "environment": environment(args),
            "sizes": asdict(sizes),
            "wall_s": wall,
            "parts": parts,
            "targets": targets.verdicts,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    if any(part["error"] is not None for part in parts.values()):
        return 1
    return targets.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
