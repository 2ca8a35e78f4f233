"""Peak memory and train-step time of LoRA over an NF4 / int8 base vs fp32, on SmolLM2-135M.

Each configuration runs in its own fresh subprocess, so its peak resident memory (``ru_maxrss``)
is its own: loading the base (quantized while loading for nf4/int8), the LoRA adapter (r=8,
alpha 16, q_proj + v_proj, fp32) and its AdamW state, and the biggest step. A subprocess times
``--warmup`` untimed and ``--steps`` timed steps (forward + backward + AdamW, full-sequence
loss) and reports their median; rounds rotate the order. After training it measures the merge:
``merge_and_unload()`` (de-quantized, folded in fp32) and ``merge_and_unload(requantize=True)``
against the adapted model, as the largest logit difference on the batch.

Targets (what the README and RESULTS.md say of a quantized base; one ``PASS`` / ``MISS`` /
``SKIP`` line each after the table, exit status 3 when one is missed, see ``targets.py``):

- weights / fp32 weights: nf4 <= 0.35, int8 <= 0.45 (the linear layers at ~4.5 and ~8 bits
  a weight, the embeddings and the tied head in fp32; RESULTS.md: 0.31 and 0.41);
- ``merge_and_unload()`` over nf4 equals the adapted model up to float rounding: largest
  logit difference <= 1e-3 (over int8 it differs by LLM.int8()'s own matmul error, and
  re-quantizing is known to lose the adapter: both reported, not judged);
- peak GPU memory / fp32's < 1 for nf4 and int8: on a GPU only (``--device cuda``); on the
  CPU the process's RSS does not show the saving (the fp32 base is a memory-mapped file, while
  quantizing goes through the heap), so those print ``SKIP`` there.

    python benchmarks/quant_memory.py --out quant.json   # the recorded figures (defaults: fp32,
                                                         # nf4, int8; batch 4 x 128; 2 rounds)
    python benchmarks/quant_memory.py --quick            # smoke run
    python benchmarks/quant_memory.py --device cuda --dtype bfloat16 --threads 4 --out quant-gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from targets import Targets

CONFIGS = ("fp32", "nf4", "int8")
WEIGHTS_TARGETS = {"nf4": 0.35, "int8": 0.45}  # weights / fp32 weights
MERGE_TARGET = 1e-3  # nf4: largest |logit difference| of merge_and_unload() vs the adapted model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on a GPU)")
    p.add_argument("--quick", action="store_true", help="1 round, 2 steps, batch 2 x seq 32")
    p.add_argument("--out", help="also write the figures as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def current_rss() -> int:
    """Resident memory now (VmRSS), not the peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from peftlab import LoraConfig, get_peft_model
    from peftlab.core import quantized
    from peftlab.models import load_causal_lm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    quant = {} if args.child == "fp32" else {"quantization": args.child, "device": args.device}
    base, _ = load_causal_lm(None, dtype=dtype, **quant)
    base.to(args.device)
    import gc

    gc.collect()
    loaded_rss = current_rss()
    footprint = base.get_memory_footprint()
    if quant:
        quantized.prepare_for_kbit_training(base, gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 40000, (args.batch_size, args.seq_len), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trained_rss = current_rss()
    gpu_peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    model.eval()
    probe = {k: v[:, :32] for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted = model(**probe).logits.float()
        with model.disable_adapter():
            base_logits = model(**probe).logits.float()
    result: dict[str, Any] = {
        "config": args.child,
        "step_s": statistics.median(times),
        "peak_rss": peak,
        "loaded_rss": loaded_rss,
        "trained_rss": trained_rss,
        "weights_bytes": footprint,
        "gpu_peak": gpu_peak,
        "loss": float(loss),
        "adapter_effect": float((adapted - base_logits).abs().max()),
    }
    if quant:
        import copy

        state = copy.deepcopy({k: v.detach() for k, v in model.adapter_parameters("default").items()})
        with torch.no_grad():
            merged = model.merge_and_unload()
            result["merge_error"] = float((merged(**probe).logits.float() - adapted).abs().max())
        # a fresh quantized base with the same adapter, merged and re-quantized
        again, _ = load_causal_lm(None, dtype=dtype, **quant)
        again2 = get_peft_model(again, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for k, v in again2.adapter_parameters("default").items():
                v.copy_(state[k])
            requant = again2.eval().merge_and_unload(requantize=True)
            result["requantize_error"] = float((requant(**probe).logits.float() - adapted).abs().max())
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.rounds, args.steps, args.batch_size, args.seq_len = 1, 2, 2, 32
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    for r in range(args.rounds):
        order = args.configs[r % len(args.configs) :] + args.configs[: r % len(args.configs)]
        for config in order:
            cmd = [sys.executable, __file__, "--child", config]
            for name in ("batch_size", "seq_len", "warmup", "steps", "threads", "device", "dtype"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            runs[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {config}: {runs[config][-1]}", file=sys.stderr)
    median = {
        c: {
            k: statistics.median(x[k] for x in rs)
            for k in ("step_s", "peak_rss", "loaded_rss", "trained_rss", "weights_bytes")
        }
        for c, rs in runs.items()
    }
    for c, rs in runs.items():
        if all(x["gpu_peak"] is not None for x in rs):
            median[c]["gpu_peak"] = statistics.median(x["gpu_peak"] for x in rs)
    mib = 1024**2
    lines = [
        f"LoRA (r=8, q+v) on SmolLM2-135M, {args.device}, {args.dtype} compute, batch "
        f"{args.batch_size} x seq {args.seq_len}, {args.threads} thread(s), {args.rounds} round(s) "
        f"x {args.steps} steps ({platform.processor() or platform.machine()})",
        "",
        "| base | weights (MiB) | RSS after load | RSS after training | peak RSS (MiB) | step (s) | "
        "weights / fp32 | RSS after training / fp32 | step / fp32 | merge error | requantize error |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    ref = median.get("fp32")
    for c, m in median.items():
        last = runs[c][-1]
        ratio_w = f"{m['weights_bytes'] / ref['weights_bytes']:.2f}" if ref else "-"
        ratio_mem = f"{m['trained_rss'] / ref['trained_rss']:.2f}" if ref else "-"
        ratio_t = f"{m['step_s'] / ref['step_s']:.2f}" if ref else "-"
        merge = f"{last['merge_error']:.2e}" if "merge_error" in last else "-"
        requant = f"{last['requantize_error']:.2e}" if "requantize_error" in last else "-"
        lines.append(
            f"| {c} | {m['weights_bytes'] / mib:.0f} | {m['loaded_rss'] / mib:.0f} | "
            f"{m['trained_rss'] / mib:.0f} | {m['peak_rss'] / mib:.0f} | {m['step_s']:.3f} | {ratio_w} | "
            f"{ratio_mem} | {ratio_t} | {merge} | {requant} |"
        )
    effect = statistics.median(x["adapter_effect"] for rs in runs.values() for x in rs)
    lines += [
        "",
        f"(the trained adapter changes the logits by up to {effect:.2e}; errors are max |logit diff|)",
    ]
    if any("gpu_peak" in m for m in median.values()):
        lines.append("peak GPU memory (MiB): " + ", ".join(
            f"{c} {m['gpu_peak'] / mib:.0f}" for c, m in median.items() if "gpu_peak" in m
        ))  # fmt: skip
    print("\n".join(lines) + "\n")
    targets = check_targets(args, runs, median)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"runs": runs, "median": median, "args": vars(args), "targets": targets.verdicts}, f, indent=2
            )
    return targets.exit_code()


def check_targets(
    args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], median: dict[str, dict[str, float]]
) -> Targets:
    targets = Targets()
    ref = median.get("fp32")
    for c, limit in WEIGHTS_TARGETS.items():
        name = f"{c} weights / fp32 weights"
        if c not in median or ref is None:
            targets.skip(name, "not run (--configs)")
        else:
            targets.at_most(name, median[c]["weights_bytes"] / ref["weights_bytes"], limit)
    name = "nf4 merge_and_unload() vs the adapted model, max |logit diff|"
    if "nf4" in runs:
        worst = max(x["merge_error"] for x in runs["nf4"])
        targets.check(name, f"{worst:.2e}", worst <= MERGE_TARGET, f"<= {MERGE_TARGET:.0e}")
    else:
        targets.skip(name, "not run (--configs)")
    for c in WEIGHTS_TARGETS:
        name = f"{c} peak GPU memory / fp32 peak GPU memory"
        if not args.device.startswith("cuda"):
            targets.skip(name, "GPU only (--device cuda): peak RSS on the CPU does not show the saving")
        elif c not in median or ref is None:
            targets.skip(name, "not run (--configs)")
        else:
            value = median[c]["gpu_peak"] / ref["gpu_peak"]
            targets.check(name, value, value < 1.0, "< 1.00")
    return targets


if __name__ == "__main__":
    sys.exit(main())
