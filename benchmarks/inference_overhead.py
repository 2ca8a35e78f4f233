"""Unmerged inference overhead of adapters vs the base model, and training-step cost vs the
frozen-base floor, on SmolLM2-135M (``peftlab.models.load_causal_lm()``).

    python benchmarks/inference_overhead.py [--repeats 5] [--threads 1] [--decode-tokens 8]
        [--workloads prefill decode train] [--methods NAME ...] [--json out.json]

Measured per method (rows of ``METHODS``; add one line there for a new method):

* prefill: one forward over a batch of 8 x 128 tokens;
* decode: ``--decode-tokens`` single-token steps with the KV cache after a short prefill
  (untimed), at batch 1 and 16, reported per token;
* train step: forward + backward + AdamW step on 2 x 128 tokens, against the floor any
  adapter in every layer pays: forward + backward through the frozen base down to the input
  embeddings (no weight gradients, no optimizer).

Base and adapted model are timed in interleaved pairs (order alternating), so load drift on
a shared machine hits both; the verdict uses the median of the per-pair ratios (the JSON
also has the ratio of medians and of minima). Targets, adapted / base, per method (its row in
``METHODS``): bottleneck adapters prefill <= 1.08, decode <= 1.15; prefix-20 prefill <= 1.05,
decode <= 1.10; prefix-100 has none (100 extra keys over 128 queries is more attention work,
a cost rather than overhead). The training ratio is reported, not judged. After the table, one
``PASS`` / ``MISS`` line per target; the exit status is 3 when one is missed (``targets.py``).

    python benchmarks/inference_overhead.py --repeats 7 --decode-tokens 8 --threads 1 \\
        --methods "bottleneck (rf=16, both)" "bottleneck (rf=16, FFN only)"   # recorded figures
    python benchmarks/inference_overhead.py --quick   # smoke run: small shapes, 1 pair each
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab import BottleneckConfig, PeftConfig, PfeifferConfig, PrefixTuningConfig, get_peft_model
from peftlab.models import load_causal_lm
from targets import Targets

ADAPTER_TARGETS = {"prefill": 1.08, "decode b1": 1.15, "decode b16": 1.15}
PREFIX_TARGETS = {"prefill": 1.05, "decode b1": 1.10, "decode b16": 1.10}


@dataclass(frozen=True)
class Method:
    config: Callable[[], PeftConfig]
    targets: dict[str, float]  # workload -> the most adapted / base may be


# one row per method measured; a new method is one line here
METHODS: dict[str, Method] = {
    "bottleneck (rf=16, both)": Method(lambda: BottleneckConfig(reduction_factor=16), ADAPTER_TARGETS),
    "bottleneck (rf=16, FFN only)": Method(lambda: PfeifferConfig(reduction_factor=16), ADAPTER_TARGETS),
    "prefix-20": Method(
        lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20), PREFIX_TARGETS
    ),
    "prefix-100": Method(lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=100), {}),
}
WORKLOADS = ("prefill", "decode", "train")

PREFILL_SHAPE = (8, 128)
DECODE_BATCHES = (1, 16)
DECODE_CONTEXT = 16
TRAIN_SHAPE = (2, 128)
QUICK_SHAPE = (2, 32)  # --quick: prefill and train shape


@dataclass
class Pairs:
    """Interleaved timings (seconds) of the base and the adapted model for one workload."""

    base: list[float] = field(default_factory=list)
    adapted: list[float] = field(default_factory=list)

    def summary(self, per: int = 1) -> dict[str, float]:
        ratios = [a / b for a, b in zip(self.adapted, self.base, strict=True)]
        return {
            "base_ms": 1e3 * statistics.median(self.base) / per,
            "adapted_ms": 1e3 * statistics.median(self.adapted) / per,
            "ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(self.adapted) / statistics.median(self.base),
            "ratio_of_minima": min(self.adapted) / min(self.base),
        }


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


Workload = tuple[Callable[[], Any], Callable[[], None] | None]  # (timed run, untimed setup)


def interleave(base: Workload, adapted: Workload, repeats: int) -> Pairs:
    """One warm-up round, then ``repeats`` rounds, each timing base and adapted once in
    alternating order; a side's setup (if any) runs untimed right before its run."""
    pairs = Pairs()
    for i in range(repeats + 1):
        order = [(base, pairs.base), (adapted, pairs.adapted)]
        for (run, setup), out in order if i % 2 == 0 else order[::-1]:
            if setup is not None:
                setup()
            t = timed(run)
            if i > 0:
                out.append(t)
    return pairs


def tokens(shape: tuple[int, int], vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, shape, generator=g)


def prefill(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False)

    return run


def decode(model: nn.Module, context: torch.Tensor, steps: torch.Tensor) -> Workload:
    """Decode ``steps`` one token at a time (fixed tokens, so base and adapted do the same
    work); the setup prefills ``context`` into a fresh KV cache."""
    state: dict[str, Any] = {}

    def setup() -> None:
        with torch.inference_mode():
            state["cache"] = model(input_ids=context, use_cache=True).cache

    def run() -> Any:
        cache = state["cache"]
        with torch.inference_mode():
            for i in range(steps.shape[1]):
                out = model(input_ids=steps[:, i : i + 1], cache=cache, use_cache=True)
                cache = out.cache
        return out

    return run, setup


def train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def run() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    return run


def frozen_floor(base: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    """Forward + backward of activations through the frozen base to the input embeddings."""
    embed = base.get_input_embeddings()  # type: ignore[operator]

    def run() -> Any:
        with torch.no_grad():
            embeds = embed(ids)
        embeds.requires_grad_(True)
        loss = base(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        return loss

    return run


def measure(base: nn.Module, name: str, config: PeftConfig, args: argparse.Namespace) -> dict[str, Any]:
    hf_config: Any = base.config
    vocab = int(hf_config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), config)
    model.eval()
    trainable, total = model.get_nb_trainable_parameters()
    row: dict[str, Any] = {"method": name, "trainable_params": trainable, "total_params": total}
    r = args.repeats

    if "prefill" in args.workloads:
        ids = tokens(args.prefill_shape, vocab, seed=0)
        row["prefill"] = interleave((prefill(base, ids), None), (prefill(model, ids), None), r).summary()
    for batch in DECODE_BATCHES if "decode" in args.workloads else ():
        context = tokens((batch, DECODE_CONTEXT), vocab, seed=1)
        steps = tokens((batch, args.decode_tokens), vocab, seed=2)
        pairs = interleave(decode(base, context, steps), decode(model, context, steps), r)
        row[f"decode b{batch}"] = pairs.summary(per=args.decode_tokens)
    if "train" in args.workloads:
        ids = tokens(args.train_shape, vocab, seed=3)
        model.train()
        floor, step = (frozen_floor(base, ids), None), (train_step(model, ids), None)
        row["train step"] = interleave(floor, step, max(3, r // 2)).summary()
    del model
    return row


def workload_label(work: str, args: argparse.Namespace) -> str:
    prefill_shape, train_shape = args.prefill_shape, args.train_shape
    return {
        "prefill": f"prefill {prefill_shape[0]}x{prefill_shape[1]}",
        "decode b1": "decode batch 1 (per token)",
        "decode b16": "decode batch 16 (per token)",
        "train step": f"train step {train_shape[0]}x{train_shape[1]} vs frozen floor",
    }[work]


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| method | trainable | workload | base ms | adapted ms | ratio (paired median) | target | verdict |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        targets = METHODS[row["method"]].targets
        for work in ("prefill", "decode b1", "decode b16", "train step"):
            if work not in row:
                continue
            s = row[work]
            target = targets.get(work)
            verdict = "-" if target is None else ("PASS" if s["ratio"] <= target else "MISS")
            target_text = "-" if target is None else f"<= {target:.2f}"
            lines.append(
                f"| {row['method']} | {row['trainable_params']:,} | {workload_label(work, args)} | "
                f"{s['base_ms']:.1f} | {s['adapted_ms']:.1f} | {s['ratio']:.3f} | {target_text} | {verdict} |"
            )
    return "\n".join(lines)


def check_targets(rows: list[dict[str, Any]], args: argparse.Namespace) -> Targets:
    targets = Targets()
    for row in rows:
        for work, limit in METHODS[row["method"]].targets.items():
            name = f"{row['method']}, {workload_label(work, args)}, adapted / base"
            if work not in row:
                targets.skip(name, "workload not run (--workloads)")
            else:
                targets.at_most(name, row[work]["ratio"], limit)
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per workload")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed per pair")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS), help="what to time"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: prefill and train {QUICK_SHAPE[0]}x{QUICK_SHAPE[1]}, 2 decode tokens, 1 pair",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    args.prefill_shape, args.train_shape = PREFILL_SHAPE, TRAIN_SHAPE
    if args.quick:
        args.prefill_shape = args.train_shape = QUICK_SHAPE
        args.repeats, args.decode_tokens = 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, _ = load_causal_lm()
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    load_before = os.getloadavg()
    rows = [measure(base, name, METHODS[name].config(), args) for name in args.methods]
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
    }
    print(markdown(rows, args))
    print(
        f"\ntorch {env['torch']}, {env['threads']} thread(s) on {env['cpus']} CPUs; load average "
        f"{env['loadavg_before'][0]:.1f} before, {env['loadavg_after'][0]:.1f} after\n"
    )
    targets = check_targets(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "targets": targets.verdicts}, f, indent=2)
    return targets.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
