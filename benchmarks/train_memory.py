"""Peak memory and train-step time of PEFT methods vs full fine-tuning on SmolLM2-135M.

One train step = forward + backward + AdamW step (the optimizer and its state are part of
both the time and the memory), with a completion-only loss: the first ``--prompt-fraction`` of
every row is prompt (labels -100). Two loss paths (``--losses``): ``plain`` is
``model(**batch, labels=...).loss`` (full ``batch x seq x vocab`` logits: transformers' own loss,
the reference), ``selected`` is the loop's own path: :func:`peftlab.training.lm_head.supervised_loss_sum`
(the head and the cross-entropy at supervised positions only, in chunks) inside
:func:`peftlab.training.saved_activations.recomputed_activations` (activation outputs recomputed
in backward, not kept).

Heap allocators (``--allocators``): ``system`` (glibc's malloc as it comes, nothing preloaded,
no tunables), ``glibc-tuned`` (glibc's malloc with ``peftlab.allocator.GLIBC_TUNABLES``, or the
candidate ``--glibc-tunables`` gives) and the ones ``peftlab`` can preload (``jemalloc``,
``mimalloc``, ``tcmalloc``; see :mod:`peftlab.allocator`); by default ``system`` and the one the
``peftlab`` command picks here (``PEFTLAB_ALLOCATOR=auto``: jemalloc when installed, else
``system``). Each child checks that the allocator it was started with is the one in place.

Methods: ``full`` (every weight trainable), ``lora`` (r=8, alpha 16, q_proj + v_proj), ``ia3``
(k_proj, v_proj, down_proj), ``bottleneck`` (reduction factor 16 after attention and FFN),
``prefix`` (20 virtual tokens).

Each method runs in its own fresh subprocess, so its peak resident memory (``ru_maxrss``,
what the kernel reports as VmHWM) is its own: loading the model, the optimizer state, the
gradients and the activations of the biggest step. One round starts one subprocess per
method, in an order rotated from round to round, so machine load hits all methods alike; a
subprocess times ``--warmup`` untimed and ``--steps`` timed steps and reports their median. A
time ratio is the median over rounds of the per-round ratio; memory ratios use the median
peak of each method. Figures go to stdout as Markdown, optionally to ``--out`` as JSON.

Targets (one ``PASS`` / ``MISS`` / ``SKIP`` line each after the tables; exit status 3 when one
is missed, see ``targets.py``), "as shipped" being the ``selected`` path under the allocator
the ``peftlab`` command picks here and "reference" ``lora/plain/system``:

- LoRA step / full step, as shipped <= 0.70;
- LoRA step, as shipped / reference <= 1.00 (the loop's path costs no more time);
- LoRA peak memory / full peak memory, as shipped <= 0.50, and LoRA peak memory, as shipped /
  reference <= 0.75: these two hold only under a preloaded allocator, jemalloc or mimalloc (glibc
  keeps freed activation blocks resident, tuned or not: RESULTS.md, issue 29), so where the
  ``peftlab`` command runs under glibc they print ``SKIP``. ``./run setup`` puts Debian's
  jemalloc into ``.venv/lib`` (see ``run``), so on a machine set up by it they are judged;
- LoRA step, as shipped / under glibc as it comes (the same loss) <= 1.05: the allocator that
  saves the memory costs no step time (issue 29).

LoRA / full peak on the plain path is printed as a reference ratio, not judged: peftlab's
loop does not take that path.

    # the recorded figures (RESULTS.md, "As shipped"):
    nice -n 10 python benchmarks/train_memory.py --methods full lora --rounds 3 --out results.json
    python benchmarks/train_memory.py                  # every method, both losses, 3 rounds, 1 thread
    python benchmarks/train_memory.py --methods full lora --allocators system jemalloc
    # glibc tuned vs as it comes, 2 threads as `peftlab train` (RESULTS.md, issue 29):
    python benchmarks/train_memory.py --methods full lora --losses selected \
        --allocators system glibc-tuned --threads 2 --rounds 2
    python benchmarks/train_memory.py --methods full lora --losses selected --allocators system glibc-tuned \
        --glibc-tunables glibc.malloc.mmap_threshold=1048576    # a candidate tuning
    python benchmarks/train_memory.py --quick          # smoke run
    python benchmarks/train_memory.py --activation-checkpointing --methods full lora
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from targets import Targets

METHODS = ("full", "lora", "ia3", "bottleneck", "prefix")
LOSSES = ("plain", "selected")
ALLOCATORS = ("system", "glibc-tuned", "jemalloc", "mimalloc", "tcmalloc")


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator of two runs ("method/loss/allocator"; allocator "shipped" stands
    for the one the peftlab command runs under here); a target when ``limit`` is given, met at
    ``<= limit``; ``needs_preload``: the target holds only under a preloaded allocator."""

    label: str
    numerator: str
    denominator: str
    kind: str  # "time" (median of per-round ratios) or "memory" (ratio of median peaks)
    limit: float | None = None
    needs_preload: bool = False


RATIOS = (
    Ratio(
        "LoRA step / full step (as shipped)", "lora/selected/shipped", "full/selected/shipped", "time", 0.70
    ),
    Ratio(
        "LoRA peak memory / full peak memory (as shipped)",
        "lora/selected/shipped",
        "full/selected/shipped",
        "memory",
        0.50,
        needs_preload=True,
    ),
    Ratio(
        "LoRA peak memory, as shipped / reference (plain loss, glibc)",
        "lora/selected/shipped",
        "lora/plain/system",
        "memory",
        0.75,
        needs_preload=True,
    ),
    Ratio(
        "LoRA step, as shipped / reference (plain loss, glibc)",
        "lora/selected/shipped",
        "lora/plain/system",
        "time",
        1.00,
    ),
    Ratio(
        "LoRA step, as shipped / glibc as it comes (same loss)",
        "lora/selected/shipped",
        "lora/selected/system",
        "time",
        1.05,
    ),
    Ratio(
        "LoRA peak memory / full peak memory (plain loss)",
        "lora/plain/shipped",
        "full/plain/shipped",
        "memory",
    ),
)


def shipped_allocator() -> str:
    """The allocator the ``peftlab`` command runs under on this machine (``PEFTLAB_ALLOCATOR=auto``)."""
    from peftlab import allocator

    return allocator.chosen("auto")


def set_tunables(text: str | None) -> None:
    """``--glibc-tunables``: what ``glibc-tuned`` means in this run (parent and children)."""
    from peftlab import allocator

    if text is not None:
        pairs = (item.split("=", 1) for item in text.split(":") if item)
        allocator.GLIBC_TUNABLES.clear()
        allocator.GLIBC_TUNABLES.update({k: v for k, v in pairs})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES, help="loss paths (both)")
    p.add_argument(
        "--allocators",
        nargs="+",
        choices=ALLOCATORS,
        default=None,
        help="heap allocators (default: system, and the one the peftlab command picks here)",
    )
    p.add_argument(
        "--glibc-tunables",
        default=None,
        metavar="NAME=VALUE:...",
        help="what glibc-tuned sets instead of peftlab.allocator.GLIBC_TUNABLES (probing candidates)",
    )
    p.add_argument("--prompt-fraction", type=float, default=0.5, help="share of each row that is prompt")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="subprocesses per method (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps in each subprocess")
    p.add_argument("--steps", type=int, default=3, help="timed steps in each subprocess (median)")
    # one thread: on cores other processes share, OpenMP's extra threads wait on each other
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer in backward, for every method (prefix tuning cannot: skipped)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1 x seq 32, 1 round, 1 step")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--loss", choices=LOSSES, default="selected", help=argparse.SUPPRESS)
    p.add_argument("--allocator", choices=ALLOCATORS, default="system", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_tunables(args.glibc_tunables)
    if args.allocators is None:
        args.allocators = sorted({"system", shipped_allocator()}, key=ALLOCATORS.index)
    if args.quick:
        args.batch_size, args.seq_len, args.rounds, args.warmup, args.steps = 1, 32, 1, 1, 1
    if min(args.batch_size, args.seq_len, args.rounds, args.steps, args.threads) < 1 or args.warmup < 0:
        p.error("sizes, rounds, steps and threads must be >= 1, warmup >= 0")
    if args.activation_checkpointing and "prefix" in args.methods and not args.child:
        print("note: prefix tuning does not run with activation checkpointing; skipped", file=sys.stderr)
        args.methods = [m for m in args.methods if m != "prefix"]
    if not {"full", "lora"} <= set(args.methods):
        p.error("--methods must include full and lora (the targets compare them)")
    if not 0 <= args.prompt_fraction < 1:
        p.error("--prompt-fraction must be in [0, 1)")
    return args


# ---- one method, in its own process ---------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from peftlab import allocator

    loaded = allocator.loaded() or "system"
    if loaded != args.allocator:
        raise SystemExit(f"started for allocator {args.allocator}, but {loaded} is loaded")
    import torch

    torch.set_num_threads(args.threads)
    from peftlab import BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
    from peftlab.models import load_causal_lm
    from peftlab.training.lm_head import supervised_loss_sum
    from peftlab.training.saved_activations import recomputed_activations, unexpanded_kv_heads

    runtime_mib = _rss_mib()  # Python + torch + transformers, before any weights
    model, _tok = load_causal_lm()
    configs: dict[str, Any] = {
        "lora": LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM
        ),
        "ia3": IA3Config(task_type=TaskType.CAUSAL_LM),
        "bottleneck": BottleneckConfig(reduction_factor=16, task_type=TaskType.CAUSAL_LM),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
    }
    if args.activation_checkpointing:
        # non-reentrant, and input grads switched on so frozen embeddings still pass gradients
        model.activation_checkpointing_enable()  # type: ignore[operator]
    torch.manual_seed(args.seed)  # the adapters' initial values
    if args.child == "full":
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, configs[args.child])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator().manual_seed(args.seed)
    config: Any = model.config
    ids = torch.randint(0, int(config.vocab_size), (args.batch_size, args.seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : int(args.prompt_fraction * args.seq_len)] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    targets = int((labels[:, 1:] != -100).sum())
    loaded_mib = _rss_mib()

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        if args.loss == "plain":
            loss = model(**batch, labels=labels).loss
        else:
            with recomputed_activations(model), unexpanded_kv_heads(model):
                loss = supervised_loss_sum(model, model, batch, labels) / targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "method": args.child,
        "loss_path": args.loss,
        "allocator": loaded,
        "step_s": statistics.median(times),
        "step_times_s": times,
        "peak_mib": _peak_mib(),
        "runtime_mib": runtime_mib,
        "loaded_mib": loaded_mib,
        "trainable": sum(p.numel() for p in params),
        "loss": float(loss.detach()),
    }


# ---- the parent: rounds of fresh subprocesses -----------------------------------------------
def _spawn(run: str, args: argparse.Namespace) -> dict[str, Any]:
    from peftlab import allocator

    method, loss, heap = run.split("/")
    command = [
        sys.executable, os.path.abspath(__file__), "--child", method, "--loss", loss,
        "--allocator", heap, "--prompt-fraction", str(args.prompt_fraction),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
        "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.activation_checkpointing:
        command.append("--activation-checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if args.glibc_tunables is not None:
        command += ["--glibc-tunables", args.glibc_tunables]
    env = allocator.untuned_environ(env)
    env.pop(allocator.REEXEC_ENV, None)
    preloads = [p for p in env.pop("LD_PRELOAD", "").replace(":", " ").split() if allocator.loaded(p) is None]
    if preloads:
        env["LD_PRELOAD"] = " ".join(preloads)
    if heap == "glibc-tuned":
        if not allocator.tunable_glibc():
            sys.exit("--allocators glibc-tuned: needs Linux with glibc 2.26 or newer")
        env = allocator.tuned_environ(env)
    elif heap != "system":
        library = allocator.find(heap)
        if library is None:
            sys.exit(f"--allocators {heap}: not installed ({allocator.INSTALL_HINT[heap]})")
        env = allocator.preload_environ(library, env)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{run} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    methods = [f"{m}/{loss}/{a}" for m in args.methods for loss in args.losses for a in args.allocators]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(args.rounds):
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:
            runs[method].append(_spawn(method, args))
            last = runs[method][-1]
            print(
                f"round {r + 1}/{args.rounds} {method}: step {last['step_s']:.2f} s, "
                f"peak {last['peak_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return runs


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def report(
    args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], meta: dict[str, Any]
) -> dict[str, Any]:
    import torch

    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_mib", "runtime_mib")}
        for m, rs in runs.items()
    }
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    lines = [
        f"SmolLM2-135M, fp32, AdamW, batch {args.batch_size} x seq {args.seq_len}, completion-only loss on "
        f"the last {1 - args.prompt_fraction:.0%} of each row, {threads}"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
        f"{args.rounds} rounds of one fresh process per method (order rotated), each {args.warmup} warm-up + "
        f"{args.steps} timed steps; allocators {', '.join(args.allocators)} "
        f"(the peftlab command's: {shipped_allocator()}); "
        f"torch {torch.__version__}, {meta['cpu']}; load average "
        f"{meta['load_before']} before, {meta['load_after']} after; wall time {meta['wall_s']:.0f} s",
        "",
        "| method / loss / allocator | trainable params | step s (median) | p25-p75 s | step / full "
        "| peak RSS MiB | peak / full | peak above runtime MiB | above-runtime / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table: dict[str, dict[str, Any]] = {}
    for method, rs in runs.items():
        _, loss, heap = method.split("/")
        ref = f"full/{loss}/{heap}"  # full fine-tuning with the same loss path and allocator
        full = runs[ref]
        above_full = med[ref]["peak_mib"] - med[ref]["runtime_mib"]
        steps = [r["step_s"] for r in rs]
        q1, q2, q3 = quartiles(steps)
        paired = [r["step_s"] / f["step_s"] for r, f in zip(rs, full, strict=True)]
        above = med[method]["peak_mib"] - med[method]["runtime_mib"]
        row = {
            "trainable": rs[0]["trainable"],
            "step_s": q2,
            "step_p25_s": q1,
            "step_p75_s": q3,
            "step_ratio_vs_full": statistics.median(paired),
            "peak_mib": med[method]["peak_mib"],
            "peak_ratio_vs_full": med[method]["peak_mib"] / med[ref]["peak_mib"],
            "above_runtime_mib": above,
            "above_runtime_ratio_vs_full": above / above_full,
            "runs": rs,
        }
        table[method] = row
        lines.append(
            f"| {method} | {row['trainable']:,d} | {q2:.2f} | {q1:.2f}-{q3:.2f} "
            f"| {row['step_ratio_vs_full']:.3f} | {row['peak_mib']:.0f} | {row['peak_ratio_vs_full']:.3f} "
            f"| {above:.0f} | {row['above_runtime_ratio_vs_full']:.3f} |"
        )
    lines += ["", "| ratio | value | target | result |", "|---|---:|---:|---|"]
    ratios = []
    shipped = shipped_allocator()
    for r in RATIOS:
        num, den = (run.replace("/shipped", f"/{shipped}") for run in (r.numerator, r.denominator))
        entry: dict[str, Any] = {"ratio": r.label, "runs": [num, den], "value": None, "limit": r.limit}
        if num in runs and den in runs:
            if r.kind == "time":
                entry["value"] = statistics.median(
                    a["step_s"] / b["step_s"] for a, b in zip(runs[num], runs[den], strict=True)
                )
            else:
                entry["value"] = med[num]["peak_mib"] / med[den]["peak_mib"]
        if r.limit is None:
            entry["result"] = ""
        elif entry["value"] is None:
            entry["result"], entry["why"] = (
                "SKIP",
                f"{num} or {den} not run (--methods, --losses, --allocators)",
            )
        elif r.needs_preload and shipped in ("system", "glibc-tuned"):
            entry["result"] = "SKIP"
            entry["why"] = (
                f"holds only under jemalloc or mimalloc; the peftlab command runs under {shipped} here "
                "(./run setup installs jemalloc into .venv/lib; or apt install libjemalloc2)"
            )
        else:
            entry["result"] = "PASS" if entry["value"] <= r.limit else "MISS"
        ratios.append(entry)
        if entry["value"] is not None:
            rule = f"<= {r.limit:.2f}" if r.limit is not None else "reference"
            lines.append(f"| {r.label} | {entry['value']:.3f} | {rule} | {entry['result']} |")
    lines.append("")
    runtime = statistics.median(m["runtime_mib"] for m in med.values())
    lines.append(f"runtime baseline (Python + torch + transformers imported, no weights): {runtime:.0f} MiB")
    print("\n".join(lines) + "\n")
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
        "environment": meta,
        "methods": table,
        "ratios": ratios,
    }


def check_targets(ratios: list[dict[str, Any]]) -> Targets:
    targets = Targets()
    for r in ratios:
        if r["result"] == "SKIP":
            targets.skip(r["ratio"], r["why"])
        elif r["result"]:
            targets.at_most(r["ratio"], r["value"], r["limit"])
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    import torch  # noqa: F401  (the report names its version)

    started = time.perf_counter()
    meta: dict[str, Any] = {
        "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    runs = measure(args)
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta["wall_s"] = time.perf_counter() - started
    result = report(args, runs, meta)
    targets = check_targets(result["ratios"])
    result["targets"] = targets.verdicts
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
