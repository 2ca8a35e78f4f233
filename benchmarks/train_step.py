"""Train-step and inference overhead of peftlab's LoRA and IA3 on SmolLM2-135M, as ratios.

Variants, each model on its own copy of the same base (``load_causal_lm(None)``, fp32):

- ``floor``: the frozen base, forward + backward with only the input embeddings' output
  requiring grad (so backward runs through every layer) and no adapter: the least a
  PEFT train step can cost.
- peftlab and HF PEFT, LoRA (r=8, alpha 16, q_proj + v_proj) and IA3 (k_proj, v_proj,
  down_proj; down_proj scaled at its input): forward + backward + AdamW step on rows whose
  every token is supervised, the loss from the model itself (``model(**batch).loss``).
- peftlab LoRA vs HF PEFT LoRA on what users train on (``--rows``): ``completion`` rows (the
  first half of each row is prompt, labels -100) and ``label-word`` rows (one supervised token
  per row, the last: classification by a label word). peftlab's step computes its loss as its
  training loop does, :func:`peftlab.training.lm_head.supervised_loss_sum` divided by the
  number of supervised tokens (the output head and the cross-entropy at the supervised
  positions only); HF PEFT's step is ``model(**batch, labels=labels).loss``, transformers'
  own loss, which computes the head at every position. Everything else is the same on both
  sides: the base weights, the rows, the LoRA config, fp32, the threads (one process) and the
  optimizer. peftlab's loop also recomputes activation outputs in backward
  (:mod:`peftlab.training.saved_activations`, a memory measure: ``train_memory.py``); that is
  left out here, so that the head is the one difference, as is gradient clipping (which both
  peftlab's loop and transformers' Trainer do). Before timing, both sides' losses on each row
  kind are checked to agree.
- inference (forward under ``torch.no_grad``): the base, and peftlab LoRA / IA3 unmerged and
  merged (``merge_adapter``).

Every train step uses AdamW with its fused kernel, as peftlab's loop and transformers' Trainer
(``adamw_torch_fused``) do. Everything runs in one process, interleaved: each repeat times
every variant once, in an order rotated from repeat to repeat, so changes in machine load hit
all variants alike. A ratio is the median over repeats of the paired per-repeat ratio
(numerator and denominator timed seconds apart). Figures go to stdout as Markdown, then one
``PASS`` / ``MISS`` line per target (exit status 3 when one is missed, see ``targets.py``),
optionally to ``--out`` as JSON.

    python benchmarks/train_step.py --repeats 9 --out results.json   # the recorded figures
    python benchmarks/train_step.py --quick         # smoke run: batch 1 x seq 32, 2 repeats
    python benchmarks/train_step.py --rows          # only the full-row variants
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab import IA3Config, LoraConfig, TaskType, get_peft_model
from peftlab.models import load_causal_lm
from peftlab.training.lm_head import IGNORE_INDEX, supervised_loss_sum
from targets import Targets

# row kinds beside the fully supervised rows: name -> (label, the supervised positions of a row)
ROW_KINDS: dict[str, tuple[str, Callable[[int], slice]]] = {
    "completion": ("completion-only rows", lambda seq: slice(seq // 2, seq)),
    "label-word": ("label-word rows", lambda seq: slice(seq - 1, seq)),
}


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator, a target when ``high`` is given: within [low, high]."""

    label: str
    numerator: str
    denominator: str
    low: float | None = None
    high: float | None = None

    def rule(self) -> str:
        if self.low is not None and self.high is not None:
            mid, tol = (self.low + self.high) / 2, (self.high - self.low) / 2
            return f"{mid:.2f} ± {tol:.2f}"
        return f"<= {self.high:.2f}" if self.high is not None else "-"

    def met(self, value: float) -> bool:
        return self.high is not None and value <= self.high and (self.low is None or value >= self.low)


RATIOS = (
    Ratio("LoRA train step / floor", "peftlab LoRA step", "floor step", high=1.05),
    Ratio("IA3 train step / floor", "peftlab IA3 step", "floor step"),
    Ratio("peftlab LoRA step / HF PEFT LoRA step", "peftlab LoRA step", "HF PEFT LoRA step", high=1.00),
    Ratio("peftlab IA3 step / HF PEFT IA3 step", "peftlab IA3 step", "HF PEFT IA3 step", high=1.00),
    *(
        Ratio(
            f"peftlab LoRA step / HF PEFT LoRA step, {label}",
            f"peftlab LoRA step, {label}",
            f"HF PEFT LoRA step, {label}",
            high=0.90,
        )
        for label, _ in ROW_KINDS.values()
    ),
    Ratio("LoRA merged / base (inference)", "LoRA merged forward", "base forward", low=0.97, high=1.03),
    Ratio("IA3 merged / base (inference)", "IA3 merged forward", "base forward", low=0.97, high=1.03),
    Ratio("LoRA unmerged / base (inference)", "LoRA unmerged forward", "base forward", high=1.10),
    Ratio("IA3 unmerged / base (inference)", "IA3 unmerged forward", "base forward", high=1.03),
)

LORA_TARGETS = ["q_proj", "v_proj"]
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = ["down_proj"]
LR = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    # one thread: on cores other processes share, OpenMP's extra threads wait on each other
    # (on a busy 2-core machine a forward runs 4-5x slower with 2 threads than with 1)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    p.add_argument(
        "--rows",
        nargs="*",
        choices=list(ROW_KINDS),
        default=list(ROW_KINDS),
        help="row kinds for peftlab LoRA vs HF PEFT LoRA beside the fully supervised rows "
        "(default: all; none: only the fully supervised rows)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1 x seq 32, 2 repeats")
    p.add_argument("--no-profile", action="store_true", help="skip the hook-timed wrapper cost")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.repeats, args.warmup = 1, 32, 2, 1
    if min(args.batch_size, args.repeats, args.threads) < 1 or args.seq_len < 2 or args.warmup < 0:
        p.error("sizes, repeats and threads must be >= 1, --seq-len >= 2, warmup >= 0")
    return args


def _hf_peft() -> Any:
    try:
        import peft
    except ImportError:
        sys.exit("this benchmark compares against HF PEFT: pip install -e '.[dev]'")
    return peft


def _require_input_grad(model: nn.Module) -> Any:
    """Make the input embeddings' output require grad while grad is enabled (the floor)."""

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            output.requires_grad_(True)

    return model.get_input_embeddings().register_forward_hook(hook)  # type: ignore[operator]


def train_step_fn(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One train step: ``loss_fn()``'s backward, then AdamW (fused, as peftlab's loop and
    transformers' Trainer run it) over ``model``'s trainable parameters, if it has any."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True) if params else None

    def step() -> None:
        model.train()
        loss_fn().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The model's own loss (``labels`` in the batch): transformers' head at every position."""
    return lambda: model(**batch).loss


def supervised_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """peftlab's loop's loss: the head at the supervised positions only, the token mean."""
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return lambda: supervised_loss_sum(model, model, inputs, labels) / count


def forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs)

    return forward


def row_labels(ids: torch.Tensor, kind: str) -> torch.Tensor:
    """``ids`` as labels, -100 outside the positions ``kind`` supervises."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    keep = ROW_KINDS[kind][1](ids.shape[1])
    labels[:, keep] = ids[:, keep]
    return labels


@dataclass
class Bench:
    variants: dict[str, Callable[[], None]]  # name -> one timed call
    trainable: dict[str, int]
    models: dict[str, nn.Module]
    batch: dict[str, torch.Tensor]
    loss_check: dict[str, dict[str, float]]


def build_variants(args: argparse.Namespace) -> Bench:
    peft = _hf_peft()
    base, _tok = load_causal_lm(None)
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed)
    config: Any = base.config
    vocab = int(config.vocab_size)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type=TaskType.CAUSAL_LM)
    ia3 = IA3Config(
        target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD, task_type=TaskType.CAUSAL_LM
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models: dict[str, nn.Module] = {
            "peftlab LoRA": get_peft_model(fresh(), lora),
            "peftlab IA3": get_peft_model(fresh(), ia3),
            "HF PEFT LoRA": peft.get_peft_model(
                fresh(),
                peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
            ),
            "HF PEFT IA3": peft.get_peft_model(
                fresh(),
                peft.IA3Config(
                    target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD, task_type="CAUSAL_LM"
                ),
            ),
            # merged copies: init_lora_weights=False gives B != 0, so merging changes the weights
            "LoRA merged": get_peft_model(fresh(), dataclasses.replace(lora, init_lora_weights=False)),
            "IA3 merged": get_peft_model(fresh(), dataclasses.replace(ia3, init_ia3_weights=False)),
        }
    for name in ("LoRA merged", "IA3 merged"):
        models[name].merge_adapter()  # type: ignore[operator]
    trainable = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad)
        for name, m in models.items()
        if "merged" not in name
    }
    ours, theirs = models["peftlab LoRA"], models["HF PEFT LoRA"]
    # the row kinds' steps train the same two LoRA models as the fully supervised rows, each
    # step with its own optimizer: what a step computes does not depend on the weights' values
    row_steps: dict[str, Callable[[], None]] = {}
    loss_check: dict[str, dict[str, float]] = {}
    for kind in args.rows:
        label = ROW_KINDS[kind][0]
        labels = row_labels(ids, kind)
        ours_loss = supervised_loss(ours, inputs, labels)
        theirs_loss = model_loss(theirs, {**inputs, "labels": labels})
        loss_check[label] = same_loss(ours, ours_loss, theirs, theirs_loss, label)
        row_steps[f"peftlab LoRA step, {label}"] = train_step_fn(ours, ours_loss)
        row_steps[f"HF PEFT LoRA step, {label}"] = train_step_fn(theirs, theirs_loss)
    _require_input_grad(base)
    variants: dict[str, Callable[[], None]] = {
        "floor step": train_step_fn(base, model_loss(base, batch)),
        "peftlab LoRA step": train_step_fn(ours, model_loss(ours, batch)),
        "HF PEFT LoRA step": train_step_fn(theirs, model_loss(theirs, batch)),
        "peftlab IA3 step": train_step_fn(models["peftlab IA3"], model_loss(models["peftlab IA3"], batch)),
        "HF PEFT IA3 step": train_step_fn(models["HF PEFT IA3"], model_loss(models["HF PEFT IA3"], batch)),
        **row_steps,
        "base forward": forward_fn(base, batch),
        "LoRA unmerged forward": forward_fn(ours, batch),
        "LoRA merged forward": forward_fn(models["LoRA merged"], batch),
        "IA3 unmerged forward": forward_fn(models["peftlab IA3"], batch),
        "IA3 merged forward": forward_fn(models["IA3 merged"], batch),
    }
    return Bench(variants, trainable, models, batch, loss_check)


def same_loss(
    ours: nn.Module,
    ours_loss: Callable[[], torch.Tensor],
    theirs: nn.Module,
    theirs_loss: Callable[[], torch.Tensor],
    label: str,
) -> dict[str, float]:
    """Both sides' losses before any step (LoRA starts at B = 0, so both are the base's): they
    must agree, or the two steps would not be computing the same thing."""
    values = {}
    for side, model, loss in (("peftlab", ours, ours_loss), ("HF PEFT", theirs, theirs_loss)):
        model.train()
        with torch.no_grad():
            values[side] = float(loss())
    diff = abs(values["peftlab"] - values["HF PEFT"])
    if not diff <= 1e-4 * max(1.0, abs(values["HF PEFT"])):
        sys.exit(f"{label}: peftlab's loss {values['peftlab']} != HF PEFT's {values['HF PEFT']}")
    return {**values, "abs_diff": diff}


def measure(variants: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call for each variant, one call per variant per round, order rotated."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
        print(f"round {r + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    return times


def wrapper_overhead(model: nn.Module, call: Callable[[], None], repeats: int = 3) -> dict[str, float]:
    """Time spent inside peftlab's wrappers beyond their base layers, per forward (medians).

    A cross-check that machine noise cannot blur: hooks time every ``AdaptedModule`` and its
    ``base_layer``; the difference is the adapter's own cost (its ops plus the wrapper's
    Python), an upper bound since the base layer's hooks run inside the wrapper's timing.
    """
    from peftlab.core.layers import AdaptedModule

    spent = {"wrapper": 0.0, "base": 0.0}
    started: dict[tuple[str, int], float] = {}

    def enter(kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any) -> None:
            started[(kind, id(module))] = time.perf_counter()

        return hook

    def leave(kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any, _out: Any) -> None:
            spent[kind] += time.perf_counter() - started.pop((kind, id(module)))

        return hook

    handles = []
    for module in model.modules():
        if isinstance(module, AdaptedModule):
            for kind, m in (("wrapper", module), ("base", module.base_layer)):
                handles += [m.register_forward_pre_hook(enter(kind)), m.register_forward_hook(leave(kind))]
    extra, total = [], []
    try:
        for _ in range(repeats):
            spent["wrapper"] = spent["base"] = 0.0
            start = time.perf_counter()
            call()
            total.append(time.perf_counter() - start)
            extra.append(spent["wrapper"] - spent["base"])
    finally:
        for h in handles:
            h.remove()
    fractions = [e / t for e, t in zip(extra, total, strict=True)]
    return {
        "adapter_ms": statistics.median(extra) * 1e3,
        "forward_ms": statistics.median(total) * 1e3,
        "fraction": statistics.median(fractions),
    }


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def report(
    args: argparse.Namespace,
    times: dict[str, list[float]],
    bench: Bench,
    overhead: dict[str, dict[str, float]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    lines = [
        f"SmolLM2-135M, fp32, batch {args.batch_size} x seq {args.seq_len}, {threads}, fused AdamW, "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up; torch {torch.__version__}, "
        f"{meta['cpu']}; load average {meta['load_before']} before, {meta['load_after']} after",
        "",
        "| variant | median ms | p25-p75 ms |",
        "|---|---:|---:|",
    ]
    for name, values in times.items():
        q1, q2, q3 = quartiles(values)
        lines.append(f"| {name} | {q2 * 1e3:.1f} | {q1 * 1e3:.1f}-{q3 * 1e3:.1f} |")
    lines += [
        "",
        "| ratio (median of paired per-repeat ratios) | value | p25-p75 | target | result |",
        "|---|---:|---:|---:|---|",
    ]
    ratios: list[dict[str, Any]] = []
    for t in RATIOS:
        if t.numerator not in times:
            continue
        paired = [a / b for a, b in zip(times[t.numerator], times[t.denominator], strict=True)]
        q1, q2, q3 = quartiles(paired)
        verdict = "" if t.high is None else ("PASS" if t.met(q2) else "MISS")
        lines.append(f"| {t.label} | {q2:.3f} | {q1:.3f}-{q3:.3f} | {t.rule()} | {verdict} |")
        ratios.append(
            {
                "ratio": t.label,
                "value": q2,
                "p25": q1,
                "p75": q3,
                "target": t.rule(),
                "result": verdict or None,
            }
        )
    if bench.loss_check:
        lines += ["", "Loss of both sides before the first step (the same rows, LoRA at B = 0):", ""]
        for label, check in bench.loss_check.items():
            lines.append(
                f"- {label}: peftlab {check['peftlab']:.6f}, HF PEFT {check['HF PEFT']:.6f} "
                f"(|diff| {check['abs_diff']:.1e})"
            )
    if overhead:
        lines += [
            "",
            "Adapter cost inside the wrappers (hook-timed, median of 3 forwards; not subject to the "
            "paired-timing noise above):",
            "",
            "| forward | adapter ms | forward ms | share of forward |",
            "|---|---:|---:|---:|",
        ]
        for name, o in overhead.items():
            lines.append(
                f"| {name} | {o['adapter_ms']:.1f} | {o['forward_ms']:.1f} | {100 * o['fraction']:.2f}% |"
            )
    lines += [
        "",
        "trainable parameters: " + ", ".join(f"{k} {v:,d}" for k, v in bench.trainable.items()),
        "",
    ]
    print("\n".join(lines))
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": meta,
        "seconds": times,
        "ratios": ratios,
        "loss_check": bench.loss_check,
        "wrapper_overhead": overhead,
        "trainable_params": bench.trainable,
    }


def check_targets(times: dict[str, list[float]]) -> Targets:
    targets = Targets()
    for t in RATIOS:
        if t.high is None:
            continue
        if t.numerator not in times:
            targets.skip(t.label, "row kind not run (--rows)")
            continue
        value = statistics.median(
            a / b for a, b in zip(times[t.numerator], times[t.denominator], strict=True)
        )
        targets.check(t.label, value, t.met(value), t.rule())
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bench = build_variants(args)
    meta: dict[str, Any] = {
        "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    times = measure(bench.variants, args.repeats, args.warmup)
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    overhead: dict[str, dict[str, float]] = {}
    if not args.no_profile:
        profiled = {
            "LoRA unmerged": "peftlab LoRA",
            "LoRA merged": "LoRA merged",
            "IA3 unmerged": "peftlab IA3",
            "IA3 merged": "IA3 merged",
        }
        for name, model in profiled.items():
            overhead[name] = wrapper_overhead(bench.models[model], bench.variants[f"{name} forward"])
    result = report(args, times, bench, overhead, meta)
    targets = check_targets(times)
    result["targets"] = targets.verdicts
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
