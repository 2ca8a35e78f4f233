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
the median of per-round ratios. Targets, for each workload: ours K=8 / ours K=1 <= 1.25 (flat
in K), and ours faster than HF PEFT at K = 4 and K = 8 (ratio < 1.00). After the tables, one
``PASS`` / ``MISS`` line per target; the exit status is 3 when one is missed (``targets.py``).

    python benchmarks/mixed_batch.py --json mixed.json   # the recorded figures (defaults)
    python benchmarks/mixed_batch.py --quick             # smoke run
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
from targets import Targets

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
    """The section's tables, and its ratios (a target's with ``limit``, ``strict`` and ``ok``)."""
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

    def add(label: str, num: str, den: str, limit: float | None = None, strict: bool = False) -> None:
        value, lo, hi = paired(times, num, den)
        row: dict[str, Any] = {"ratio": label, "value": value, "p25": lo, "p75": hi, "result": ""}
        rule = ""
        if limit is not None:
            ok = value < limit if strict else value <= limit
            rule = f"{'<' if strict else '<='} {limit:.2f}"
            row.update(rule=rule, ok=ok, result="PASS" if ok else "MISS")
        lines.append(f"| {label} | {value:.3f} | {lo:.3f}-{hi:.3f} | {rule} | {row['result']} |")
        rows.append(row)

    for k in KS[1:]:
        add(f"peftlab K={k} / K=1", f"peftlab K={k}", "peftlab K=1", TARGET_FLAT if k == max(KS) else None)
    for k in KS:
        # judged from K=4 on: HF PEFT runs each distinct adapter on its own sub-batch, a cost growing with K
        judged = k >= 4
        add(
            f"peftlab K={k} / HF PEFT K={k}",
            f"peftlab K={k}",
            f"HF PEFT K={k}",
            1.0 if judged else None,
            strict=True,
        )
    add("peftlab K=1 / one adapter (set_adapter)", "peftlab K=1", "peftlab one adapter (set_adapter)")
    add("peftlab mixed methods / K=1", "peftlab mixed methods (4)", "peftlab K=1")
    add("HF PEFT K=8 / HF PEFT K=1", "HF PEFT K=8", "HF PEFT K=1")
    return "\n".join(lines), rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each variant once per round)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=16, help=f"samples per batch (at least {max(KS)})")
    parser.add_argument("--prefill-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=8)
    workloads = ["prefill", "decode"]
    parser.add_argument("--workloads", nargs="*", default=workloads, choices=workloads)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, batch 8 x 8 tokens, 2 decode tokens"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.batch, args.prefill_len, args.decode_tokens = 1, max(KS), 8, 2
    if args.batch < max(KS):
        parser.error(
            f"--batch must be at least {max(KS)}, so that a K={max(KS)} batch holds {max(KS)} adapters"
        )
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
    results = {}
    judged: list[tuple[str, dict[str, Any]]] = []
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
        results[workload] = {"times_s": times, "ratios": rows}
        judged += [(workload, row) for row in rows if "ok" in row]
    env = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "max_abs_logit_diff_vs_peft": diff,
        "wall_s": round(time.time() - started, 1),
    }
    print(f"wall time {env['wall_s']} s\n")
    targets = Targets()
    for workload, row in judged:
        targets.check(f"{row['ratio']} ({workload})", row["value"], row["ok"], row["rule"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"env": env, "args": vars(args), "results": results, "targets": targets.verdicts}, f, indent=2
            )
    return targets.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
