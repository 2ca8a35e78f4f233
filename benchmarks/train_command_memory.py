"""``peftlab train`` itself: LoRA vs full fine-tuning peak memory and step time, per allocator (issue 29).

``train_memory.py`` measures the training loop's step in a process of its own; this runs the
command a user runs, whole (loading, training, saving), on the embedded SmolLM2-135M, CPU, fp32:

    python -m peftlab train --method {full,lora} --data rows.jsonl --batch-size 4 --max-length 128 ...

``rows.jsonl`` holds prompt/completion rows of real text, ~128 tokens each after SmolLM2's chat
template (completion-only loss: the prompt's tokens are not supervised): Rotten Tomatoes review
snippets (the ``rotten-tomatoes`` task's file), a few to the prompt, a few to the completion.

Each run is a fresh process (peak = the child's ``ru_maxrss`` from ``wait4``, its resident-set
high-water mark); step time is the median of its steps after the first (``metrics.json``). One
round runs every method under every allocator (``--allocators``: ``system`` is glibc's malloc
as it comes, ``auto`` what the ``peftlab`` command picks here: jemalloc when ``./run setup``
installed it into ``.venv/lib``, or the system has it), in an order rotated from round to round,
one after the other, never side by side. A time ratio is the median of per-round ratios; a
memory ratio is the ratio of median peaks.

Targets (issue 29, item 5; ``PASS`` / ``MISS`` / ``SKIP`` lines, exit status 3 on a miss):

- LoRA peak / full peak under ``auto`` <= 0.50;
- LoRA step under ``auto`` / under ``system`` <= 1.05 (the memory costs no step time).

Where ``auto`` is glibc's malloc (no jemalloc found), both are ``SKIP``: glibc alone does not
reach 0.50 (RESULTS.md, issue 29).

    python benchmarks/train_command_memory.py                       # 2 rounds, 8 steps: ~10 min
    python benchmarks/train_command_memory.py --quick               # smoke run: 1 round, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare_memory import peak_of
from targets import Targets

METHODS = ("full", "lora")
ALLOCATORS = ("system", "auto")


def write_rows(path: Path, count: int, seed: int) -> None:
    """``count`` prompt/completion rows of review snippets: 3 to the prompt, 2 to the completion."""
    from peftlab.data.rotten_tomatoes import read_snippets, rotten_tomatoes_file

    snippets = [text for text, _, _ in read_snippets(rotten_tomatoes_file())[0]]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            pick = rng.sample(snippets, 5)
            prompt = "Write two more reviews in the style of these:\n" + "\n".join(pick[:3])
            f.write(json.dumps({"prompt": prompt, "completion": "\n".join(pick[3:])}) + "\n")


def run_once(method: str, alloc: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``peftlab train`` in its own process: its peak RSS, step times and allocator."""
    cmd = [
        sys.executable, "-m", "peftlab", "train", "--method", method, "--data", str(data),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--steps", str(args.steps),
        "--dtype", "float32", "--device", "cpu", "--save-every", "0", "--num-eval", "0",
        "--eval-fraction", "0.05", "--out", str(out), "--seed", str(args.seed),
    ]  # fmt: skip
    drop = ("LD_PRELOAD", "PEFTLAB_ALLOCATOR_PRELOADED", "GLIBC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PEFTLAB_ALLOCATOR"] = alloc
    peak, wall = peak_of(cmd, env)
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["history"]["step_times"][1:] or metrics["history"]["step_times"]
    return {
        "peak_mib": peak / 2**20,
        "step_s": statistics.median(steps),
        "allocator": metrics["allocator"],
        "max_length": metrics["lengths"]["max_length"],
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 steps")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 2
    if min(args.rounds, args.steps, args.batch_size, args.max_length) < 1:
        p.error("--rounds, --steps, --batch-size and --max-length must be >= 1")
    if "lora" not in args.methods:
        p.error("--methods must include lora (the targets are LoRA's)")
    from peftlab import allocator

    shipped = allocator.chosen("auto")
    runs: dict[str, list[dict[str, Any]]] = {}
    combos = [(m, a) for m in args.methods for a in args.allocators]
    load = os.getloadavg()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftlab-train-memory-") as tmp:
        data = Path(tmp) / "rows.jsonl"
        write_rows(data, 2 * args.steps * args.batch_size + 16, args.seed)
        for r in range(args.rounds):
            for i in range(len(combos)):
                method, alloc = combos[(i + r) % len(combos)]
                row = run_once(method, alloc, data, Path(tmp) / f"{method}-{alloc}-{r}", args)
                runs.setdefault(f"{method}/{alloc}", []).append(row)
                print(
                    f"round {r + 1}/{args.rounds} {method}/{alloc} ({row['allocator']}): "
                    f"step {row['step_s']:.2f} s, peak {row['peak_mib']:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    after = os.getloadavg()
    med = {k: {"peak_mib": statistics.median(x["peak_mib"] for x in v)} for k, v in runs.items()}
    length = runs["lora/" + args.allocators[0]][0]["max_length"]
    print(
        f"peftlab train, SmolLM2-135M, fp32, CPU, batch {args.batch_size} x max {args.max_length} "
        f"(rows padded to {length}), completion-only loss, {args.steps} steps; {args.rounds} rounds of "
        f"one fresh process per method and allocator (order rotated); auto = {shipped} here; "
        f"load average {load[0]:.1f} before, {after[0]:.1f} after; wall {time.perf_counter() - wall:.0f} s\n"
    )
    print("| method / allocator | step s (median) | peak RSS MiB (median) | per-round peaks |")
    print("|---|---:|---:|---|")
    for key, rows in runs.items():
        step = statistics.median(x["step_s"] for x in rows)
        peaks = " / ".join(f"{x['peak_mib']:.0f}" for x in rows)
        print(f"| {key} ({rows[0]['allocator']}) | {step:.2f} | {med[key]['peak_mib']:.0f} | {peaks} |")
    print()
    targets = Targets()
    ratio_name = "LoRA peak / full peak (peftlab train, auto)"
    step_name = "LoRA step, auto / system (peftlab train)"
    result: dict[str, Any] = {"settings": vars(args), "auto": shipped, "runs": runs}
    if shipped in ("system", allocator.GLIBC_TUNED) or "auto" not in args.allocators:
        why = f"auto is {shipped} here (./run setup installs jemalloc into .venv/lib)"
        targets.skip(ratio_name, why if "auto" in args.allocators else "auto not run (--allocators)")
        targets.skip(step_name, why if "auto" in args.allocators else "auto not run (--allocators)")
    else:
        if "full" in args.methods:
            result["peak_ratio"] = med["lora/auto"]["peak_mib"] / med["full/auto"]["peak_mib"]
            targets.at_most(ratio_name, result["peak_ratio"], 0.50)
        else:
            targets.skip(ratio_name, "full not run (--methods)")
        if "system" in args.allocators:
            result["step_ratio"] = statistics.median(
                a["step_s"] / b["step_s"] for a, b in zip(runs["lora/auto"], runs["lora/system"], strict=True)
            )
            targets.at_most(step_name, result["step_ratio"], 1.05)
            if "full" in args.methods:
                result["peak_ratio_system"] = med["lora/system"]["peak_mib"] / med["full/system"]["peak_mib"]
                ref = result["peak_ratio_system"]
                print(f"reference: LoRA peak / full peak under system (glibc): {ref:.3f}")
        else:
            targets.skip(step_name, "system not run (--allocators)")
    result["targets"] = targets.verdicts
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
