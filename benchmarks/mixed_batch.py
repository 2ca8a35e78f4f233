"""Mixed-adapter batches on SmolLM2-135M: cost vs the number K of distinct adapters in a batch.

    python benchmarks/mixed_batch.py [--repeats 5] [--threads 1] [--batch 16] [--prefill-len 32]
        [--decode-tokens 8] [--json out.json]

One batch of ``--batch`` samples, each with its own adapter name (``adapter_names=``), cycling
over K = 1, 2, 4, 8 distinct LoRA adapters (r=8 on q and v), plus one mixed-method batch
(LoRA, IA3, bottleneck and prefix tuning side by side), against

* the same batch with one adapter set for everyone (``set_adapter``, no per-sample routing),
* HF PEFT's mixed batch (``adapter_names=``) with the very same LoRA weights (loaded from the
  checkpoints peftlab saves), which runs each distinct adapter on its own sub-batch.

Workloads: prefill (one forward over batch x prefill-len tokens) and decode (``generate`` of
``--decode-tokens`` tokens after a 16-token context, reported per token). Every variant runs
once per round, in an order rotated each round, so load drift hits all of them; ratios are
the median of per-round ratios. Targets: ours K=8 / ours K=1 <= 1.25 (flat in K), and ours
faster than HF PEFT at K >= 4.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftlab import BottleneckConfig, IA3Config, LoraConfig, PeftModel, PrefixTuningConfig
from peftlab.models import load_causal_lm

KS = (1, 2, 4, 8)
CONTEXT = 16
TARGET_FLAT = 1.25


def lora_names(k: int, batch: int) -> list[str]:
    return [f"lora{i % k}" for i in range(batch)]


def build(base: nn.Module, tmp: str) -> tuple[PeftModel, Any]:
    """peftlab with 8 LoRA adapters + IA3 + bottleneck + prefix, and HF PEFT with the same LoRAs."""
    import peft

    ours = PeftModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for i in range(max(KS)):
        ours.add_adapter(f"lora{i}", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
    ours.add_adapter("ia3", IA3Config(init_ia3_weights=False))
    ours.add_adapter("bottleneck", BottleneckConfig(reduction_factor=16))
    ours.add_adapter("prefix", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    ours.set_adapter("lora0")
    ours.eval()
    theirs: Any = None
    for i in range(max(KS)):
        path = os.path.join(tmp, f"lora{i}")
        ours.save_pretrained(path, selected_adapters=[f"lora{i}"])
        found = os.path.join(path, f"lora{i}") if os.path.isdir(os.path.join(path, f"lora{i}")) else path
        if theirs is None:
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), found, adapter_name=f"lora{i}")
        else:
            theirs.load_adapter(found, adapter_name=f"lora{i}")
    theirs.eval()
    return ours, theirs


def check_same(ours: PeftModel, theirs: Any, ids: torch.Tensor) -> float:
    names = lora_names(max(KS), ids.shape[0])
    with torch.no_grad():
        a = ours(input_ids=ids, adapter_names=names).logits
        b = theirs(input_ids=ids, adapter_names=names).logits
    return float((a - b).abs().max())


def prefill(model: Any, ids: torch.Tensor, names: list[str] | None) -> Callable[[], Any]:
    kw = {} if names is None else {"adapter_names": names}

    def run() -> Any:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, **kw)

    return run


def decode(model: Any, ids: torch.Tensor, names: list[str] | None, tokens: int) -> Callable[[], Any]:
    kw: dict[str, Any] = {} if names is None else {"adapter_names": names}

    def run() -> Any:
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=0,
                **kw,
            )

    return run


def variants(ours: PeftModel, theirs: Any, batch: int) -> dict[str, tuple[Any, list[str] | None, Callable]]:
    """name -> (model, adapter_names, setup called before each timing)."""

    def ours_single() -> None:
        ours.set_adapter("lora0")

    def theirs_single() -> None:
        theirs.set_adapter("lora0")

    def none() -> None:
        pass

    table: dict[str, tuple[Any, list[str] | None, Callable]] = {
        "peftlab one adapter (set_adapter)": (ours, None, ours_single),
        "HF PEFT one adapter (set_adapter)": (theirs, None, theirs_single),
    }
    for k in KS:
        table[f"peftlab K={k}"] = (ours, lora_names(k, batch), none)
        table[f"HF PEFT K={k}"] = (theirs, lora_names(k, batch), none)
    mixed = ["lora0", "ia3", "bottleneck", "prefix"]
    table["peftlab mixed methods (4)"] = (ours, [mixed[i % 4] for i in range(batch)], none)
    return table


def measure(
    table: dict[str, tuple[Any, list[str] | None, Callable]],
    make: Callable[[Any, list[str] | None], Callable[[], Any]],
    repeats: int,
) -> dict[str, list[float]]:
    names = list(table)
    times: dict[str, list[float]] = {n: [] for n in names}
    for model, adapter_names, setup in table.values():  # warm-up
        setup()
        make(model, adapter_names)()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            model, adapter_names, setup = table[name]
            setup()
            fn = make(model, adapter_names)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    ratios = sorted(a / b for a, b in zip(times[num], times[den], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def report(workload: str, times: dict[str, list[float]], per: int) -> tuple[str, list[dict[str, Any]]]:
    lines = [f"#### {workload}", "", "| variant | median ms | p25-p75 ms |", "|---|---:|---:|"]
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        lines.append(
            f"| {name} | {1e3 * statistics.median(values) / per:.1f} | "
            f"{1e3 * q[0] / per:.1f}-{1e3 * q[2] / per:.1f} |"
        )
    lines += ["", "| ratio (median of per-round ratios) | value | p25-p75 | target | result |"]
    lines.append("|---|---:|---:|---:|---|")
    rows: list[dict[str, Any]] = []

    def add(label: str, num: str, den: str, target: str = "", ok: bool | None = None) -> None:
        value, lo, hi = paired(times, num, den)
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"| {label} | {value:.3f} | {lo:.3f}-{hi:.3f} | {target} | {verdict} |")
        rows.append({"ratio": label, "value": value, "p25": lo, "p75": hi, "result": verdict})

    for k in KS[1:]:
        value = paired(times, f"peftlab K={k}", "peftlab K=1")[0]
        flat = k == max(KS)
        add(f"peftlab K={k} / K=1", f"peftlab K={k}", "peftlab K=1", "≤ 1.25" if flat else "", None)
        if flat:
            rows[-1]["result"] = "PASS" if value <= TARGET_FLAT else "MISS"
            lines[-1] = lines[-1].rsplit("|", 2)[0] + f"| {rows[-1]['result']} |"
    for k in KS:
        value = paired(times, f"peftlab K={k}", f"HF PEFT K={k}")[0]
        judged = k >= 4
        add(
            f"peftlab K={k} / HF PEFT K={k}",
            f"peftlab K={k}",
            f"HF PEFT K={k}",
            "< 1.00" if judged else "",
            (value < 1.0) if judged else None,
        )
    add("peftlab K=1 / one adapter (set_adapter)", "peftlab K=1", "peftlab one adapter (set_adapter)")
    add("peftlab mixed methods / K=1", "peftlab mixed methods (4)", "peftlab K=1")
    add("HF PEFT K=8 / HF PEFT K=1", "HF PEFT K=8", "HF PEFT K=1")
    return "\n".join(lines), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each variant once per round)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=8)
    workloads = ["prefill", "decode"]
    parser.add_argument("--workloads", nargs="*", default=workloads, choices=workloads)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    base, _ = load_causal_lm()
    base.eval()
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(10, vocab, (args.batch, args.prefill_len), generator=g)
    context = torch.randint(10, vocab, (args.batch, CONTEXT), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build(base, tmp)
    diff = check_same(ours, theirs, prefill_ids[:, :8])
    print(f"max |peftlab - HF PEFT| logits on a K=8 batch: {diff:.2e}")
    table = variants(ours, theirs, args.batch)
    sections, results = [], {}
    for workload in args.workloads:
        if workload == "prefill":
            times = measure(table, lambda m, n: prefill(m, prefill_ids, n), args.repeats)
            text, rows = report(f"prefill ({args.batch} x {args.prefill_len} tokens)", times, 1)
        else:
            times = measure(table, lambda m, n: decode(m, context, n, args.decode_tokens), args.repeats)
            text, rows = report(
                f"decode (generate {args.decode_tokens} tokens after {CONTEXT}, batch {args.batch}; "
                "ms per generated token)",
                times,
                args.decode_tokens,
            )
        print(text + "\n", flush=True)
        sections.append(text)
        results[workload] = {"times_s": times, "ratios": rows}
    env = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "max_abs_logit_diff_vs_peft": diff,
        "wall_s": round(time.time() - started, 1),
    }
    print(f"wall time {env['wall_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
