"""One comparison's shared state: the frozen base model, the data (train, a validation split
carved from train, the held-out test split) encoded once within lengths taken from the data,
and how a model of this kind trains, validates and is tested.

How quality is measured depends on the model and the data (see :mod:`peftlab.training.classify`):
an encoder (``--model minilm``) gets a classification head and is scored on its argmax; a
causal LM on classification data is scored by label-word likelihood; on prompt/completion data
it generates greedily and is scored by exact match, token F1, ROUGE-L and BLEU. Every mode
also reports the held-out loss (and perplexity for causal LMs).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.compare.options import CompareOptions, resolve_sizes, run_kind
from peftlab.core.config import TaskType
from peftlab.core.peft_model import PeftModel, get_peft_model
from peftlab.core.quantized import prepare_for_kbit_training
from peftlab.count import activation_assumption
from peftlab.data.catalog import get_task
from peftlab.data.files import stratified_split, task_from_files, task_from_hf_dataset
from peftlab.data.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    classification_metrics,
    example_scores,
    macro_f1_indices,
    perplexity,
)
from peftlab.data.tasks import Example, Task
from peftlab.devices import Precision, peak_memory
from peftlab.models import load_causal_lm, load_sequence_classifier, load_tokenizer, model_kind
from peftlab.presets import MethodPreset
from peftlab.training.classify import ClassifierAsNextToken, classify, encode_texts, score_label_words
from peftlab.training.fitting import (
    FitReport,
    LengthPlan,
    PromptFormat,
    check_lost,
    context_length,
    example_lengths,
    fit_examples,
    plan_lengths,
)
from peftlab.training.loop import (
    Encoded,
    TrainConfig,
    TrainHistory,
    TrainLoop,
    collate,
    evaluate_loss,
    evaluate_task,
    pad_id,
    rng_state,
)

# the activation memory a batch may take at the chosen length (what caps --seq-len from the data)
MEMORY_BUDGET = {"default": 4 * 2**30, "quick": 1 * 2**30}
VALIDATION_SALT = "peftlab-compare-validation"

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
    return get_task(opts.task or "rotten-tomatoes", seed=seed)


@dataclass
class Split:
    """One split as the run uses it: the examples kept, their encodings, what was cut."""

    examples: list[Example]
    encoded: list[Encoded]
    fit: FitReport


@dataclass
class Validation:
    loss: float
    metric: float | None  # the task metric where it costs nothing extra (classification)


@dataclass
class TestOutput:
    """A model's held-out results: metrics, and what the bootstrap and paired tests resample."""

    metrics: dict[str, float]
    samples: list[dict[str, str]]
    predictions: list[Any]  # class indices (classification) or generated strings
    references: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainOutcome:
    history: TrainHistory
    examples_seen: int
    best_examples: int | None = None
    validations: list[dict[str, float | None]] = field(default_factory=list)
    reason: str = "budget"  # "budget", "stopped" (on_validation said so) or "paused" (stop_at)
    still_improving: bool = False
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated over training (CUDA only)
    wall_s: float = 0.0  # training time so far, validations included
    # a paused run goes on from here with Session.resume: its loop and the RNG it paused with
    loop: TrainLoop | None = field(default=None, repr=False)
    rng: dict[str, Any] | None = field(default=None, repr=False)


class EarlyStopping:
    """Stop when the validation loss has not improved for ``patience`` validations; keeps a copy
    of the trainable state of the best one, which :meth:`restore` puts back."""

    def __init__(self, model: nn.Module, patience: int, heartbeat: Callable[[], None] = lambda: None) -> None:
        self.model = model
        self.patience = patience
        self.heartbeat = heartbeat
        self.best_loss = float("inf")
        self.best_examples: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.losses: list[float] = []
        self.waited = 0

    def __call__(self, seen: int, result: Validation) -> bool:
        self.heartbeat()
        self.losses.append(result.loss)
        if result.loss < self.best_loss:
            self.best_loss, self.best_examples, self.waited = result.loss, seen, 0
            self.best_state = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self) -> None:
        if self.best_state is None:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value)
        self.best_state = None

    def still_improving(self, reason: str) -> bool:
        """Whether the budget ended a run whose validation loss was still falling clearly (by more
        than 1% over its last validation interval)."""
        if reason != "budget" or len(self.losses) < 2:
            return False
        return self.losses[-1] < 0.99 * self.losses[-2]


class Session:
    """Everything the methods of one comparison share (see the module docstring)."""

    def __init__(self, opts: CompareOptions, *, verbose: bool = False) -> None:
        opts.validate()
        self.opts = opts
        self.verbose = verbose
        self._quantized: dict[str, nn.Module] = {}
        # an unavailable device or a dtype it cannot run is refused before anything loads
        self.precision = Precision.resolve(opts.device, opts.dtype)
        self.model_kind = model_kind(opts.model, opts.gguf_file)
        self.task = load_task(opts, self.model_kind)
        self.kind = run_kind(self.model_kind, self.task)
        self.sizes = resolve_sizes(opts, self.kind)
        chat_rows = self.task.info.get("kind") == "chat"
        template = opts.chat_template or ("auto" if chat_rows else "none")
        if chat_rows and self.model_kind != "encoder":
            # chat rows on a model without a chat template: refused before the weights load
            tokenizer = load_tokenizer(opts.model, gguf_file=opts.gguf_file)
            PromptFormat.resolve(tokenizer, template, chat_rows=True)
        torch.manual_seed(0)
        if self.model_kind == "encoder":
            self.base, self.tokenizer = load_sequence_classifier(
                opts.model or "minilm",
                self.task.labels,
                dtype=self.precision.dtype,
                device=self.precision.device,
                verbose=verbose,
            )
            self.task_type = TaskType.SEQ_CLS
        else:
            self.base, self.tokenizer = load_causal_lm(
                opts.model,
                gguf_file=opts.gguf_file,
                dtype=self.precision.dtype,
                device=self.precision.device,
                verbose=verbose,
            )
            self.task_type = TaskType.CAUSAL_LM
        self.fmt = PromptFormat.resolve(self.tokenizer, template, chat_rows=chat_rows)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.pad = pad_id(self.tokenizer)
        self.metric = opts.metric or self.task.metric
        train, val = self._carve_validation()
        test = list(self.task.eval[: self.sizes["num_eval"]])
        self.plan = self._plan_lengths(train)
        self.train_split = self._fit(train, "train")
        self.val_split = self._fit(val, "validation")
        self.test_split = self._fit(test, "test")
        for split in (self.train_split, self.val_split, self.test_split):
            check_lost(split.fit, self.plan)
        batch = collate(self.test_split.encoded[: self.sizes["batch_size"]], self.pad)
        self.latency_inputs = {k: v.to(self.precision.device) for k, v in batch.items() if k != "labels"}

    # ---- data ------------------------------------------------------------------------------
    def _carve_validation(self) -> tuple[list[Example], list[Example]]:
        """A validation split from the training rows (stratified by label); the test split is
        never looked at before the final runs."""
        train = list(self.task.train)
        wanted = self.sizes["val_size"]
        if len(train) < 2 * wanted:
            raise ValueError(
                f"{len(train)} training rows are too few to hold out {wanted} for validation and train on "
                "the rest; add rows (or pass --quick for a small run)"
            )
        rest, val = stratified_split(train, wanted / len(train), salt=VALIDATION_SALT)
        return rest, val

    def _plan_lengths(self, train: list[Example]) -> LengthPlan:
        acts = activation_assumption(self.base.config, self.base, 1, 1)
        budget = MEMORY_BUDGET["quick" if self.opts.quick else "default"]
        if self.model_kind == "encoder":
            lengths = [(len(self.tokenizer(ex.text or "")["input_ids"]), 0) for ex in train]
        else:
            lengths = example_lengths(self.tokenizer, train, self.fmt)
        return plan_lengths(
            lengths,
            requested=self.opts.seq_len,
            context=context_length(self.base),
            bytes_per_token=acts.bytes(self.precision.dtype.itemsize),
            batch_size=self.sizes["batch_size"],
            budget_bytes=budget,
        )

    def _fit(self, examples: list[Example], part: str) -> Split:
        if self.model_kind == "encoder":
            # an encoder's text is cut from the end by its tokenizer; there is no completion to keep
            encoded = encode_texts(self.tokenizer, examples, self.task.labels, self.plan.max_length)
            report = FitReport(part, rows=len(examples), kept=len(examples))
            for ex, enc in zip(examples, encoded, strict=True):
                full = len(self.tokenizer(ex.text or "")["input_ids"])
                if full > len(enc.input_ids):
                    report.truncated += 1
                    if len(report.first_truncated) < 5:
                        report.first_truncated.append(
                            f"{ex.source or part}: text of {full} tokens cut to {len(enc.input_ids)}"
                        )
            return Split(examples, encoded, report)
        kept, encoded, report = fit_examples(
            self.tokenizer, examples, self.plan.max_length, part=part, fmt=self.fmt
        )
        return Split(kept, encoded, report)

    # ---- models ----------------------------------------------------------------------------
    def prepare(self, preset: MethodPreset, seed: int) -> tuple[nn.Module, PeftModel | None]:
        """A fresh copy of the base with the preset's adapter (all weights trainable for full
        fine-tuning), initialised from ``seed``; what trains is fp32 (:class:`Precision`)."""
        torch.manual_seed(seed)
        model = copy.deepcopy(self.base if preset.quantize is None else self.quantized_base(preset.quantize))
        config = preset.config(model.config, self.task_type)
        if config is None:
            for p in model.parameters():
                p.requires_grad_(True)
            return self.precision.prepare(model), None
        peft = get_peft_model(model, config)
        self.precision.prepare(peft)
        if preset.quantize is not None:
            prepare_for_kbit_training(peft, gradient_checkpointing=False)
        return peft, peft

    def quantized_base(self, scheme: str) -> nn.Module:
        """The base loaded again, quantized (``qlora``), once per comparison."""
        found = self._quantized.get(scheme)
        if found is None:
            if self.model_kind == "encoder":
                raise ValueError(f"a base quantized to {scheme} is for causal LMs; drop qlora from --methods")
            found, _ = load_causal_lm(
                self.opts.model,
                gguf_file=self.opts.gguf_file,
                dtype=self.precision.dtype,
                device=self.precision.device,
                verbose=self.verbose,
                quantization=scheme,
            )
            for p in found.parameters():
                p.requires_grad_(False)
            self._quantized[scheme] = found
        return found

    def train(
        self,
        model: nn.Module,
        learning_rate: float,
        seed: int,
        *,
        budget: int,
        on_validation: Callable[[int, Validation], bool],
        desc: str,
        stop_at: int | None = None,
    ) -> TrainOutcome:
        """Train on the schedule of ``budget`` examples, validating every ``eval_every`` examples;
        training stops early when ``on_validation(examples seen, result)`` returns True, and
        pauses after ``stop_at`` examples (reason "paused"), from where :meth:`resume` goes on
        exactly as an uninterrupted run would (a search trial is the start of its final run)."""
        sizes = self.sizes
        steps = max(1, budget // sizes["batch_size"])
        config = TrainConfig(
            steps=steps,
            batch_size=sizes["batch_size"],
            learning_rate=learning_rate,
            warmup_steps=min(steps // 10, 5),
            max_length=self.plan.max_length,
            seed=seed,
        )
        forward = ClassifierAsNextToken(model) if self.kind == "encoder-classification" else None
        loop = TrainLoop(
            model,
            self.train_split.encoded,
            config,
            pad_token_id=self.pad,
            forward_module=forward,
            precision=self.precision,
        )
        outcome = TrainOutcome(loop.history, 0, loop=loop)
        return self._advance(outcome, model, on_validation, desc, stop_at)

    def resume(
        self,
        outcome: TrainOutcome,
        model: nn.Module,
        *,
        on_validation: Callable[[int, Validation], bool],
        desc: str,
    ) -> TrainOutcome:
        """Go on with a run :meth:`train` paused, to the end of its budget (or an early stop)."""
        if outcome.reason != "paused" or outcome.loop is None:
            raise ValueError(f"only a paused run can be resumed (this one ended: {outcome.reason})")
        return self._advance(outcome, model, on_validation, desc, None)

    def _advance(
        self,
        outcome: TrainOutcome,
        model: nn.Module,
        on_validation: Callable[[int, Validation], bool],
        desc: str,
        stop_at: int | None,
    ) -> TrainOutcome:
        loop = outcome.loop
        assert loop is not None
        batch = self.sizes["batch_size"]
        every = max(1, self.sizes["eval_every"] // batch)
        steps = loop.config.steps
        pause = steps if stop_at is None else min(steps, max(1, stop_at // batch))
        outcome.reason = "budget"

        def on_step(current: TrainLoop) -> None:
            if current.step % every == 0 or current.step == steps:
                seen = current.step * batch
                result = self.validate(model)
                outcome.validations.append({"examples": seen, "loss": result.loss, "metric": result.metric})
                if on_validation(seen, result):
                    current.stop_requested = True
                    outcome.reason = "stopped"
                    return
            if current.step >= pause and current.step < steps:
                current.stop_requested = True
                outcome.reason = "paused"
                outcome.rng = rng_state()  # inside the run's RNG: what it goes on with

        loop.stop_requested = False
        if outcome.rng is not None:
            loop.resume_rng, outcome.rng = outcome.rng, None
        started = time.perf_counter()
        with peak_memory(self.precision.device) as peak:
            loop.run(desc=desc, on_step=on_step, progress=False)
        outcome.wall_s += time.perf_counter() - started
        outcome.peak_gpu_bytes = peak["peak_bytes"]
        outcome.examples_seen = loop.step * batch
        if outcome.reason != "paused":
            outcome.loop = None  # nothing goes on from here: let the optimizer state go
        return outcome

    @torch.no_grad()
    def validate(self, model: nn.Module) -> Validation:
        """Loss on the validation split (and the task metric where it comes with the loss)."""
        labels = self.task.labels
        encoded = self.val_split.encoded
        with self.precision.autocast():
            if self.kind == "encoder-classification":
                indices, loss = classify(model, encoded, self.pad)
            elif self.kind == "causal-classification":
                indices, loss = score_label_words(
                    model, self.tokenizer, encoded, labels, pad_token_id=self.pad
                )
            else:
                return Validation(evaluate_loss(model, encoded, pad_token_id=self.pad), None)
        references = [labels.index(str(ex.label)) for ex in self.val_split.examples]
        accuracy = float(np.mean(np.asarray(indices) == np.asarray(references)))
        return Validation(loss, accuracy if self.metric == "accuracy" else None)

    @torch.no_grad()
    def evaluate_test(self, model: nn.Module) -> TestOutput:
        """The model's held-out metrics and per-example outputs on the test split (in the
        session's precision)."""
        with self.precision.autocast():
            return self._evaluate_test(model)

    def _evaluate_test(self, model: nn.Module) -> TestOutput:
        labels = self.task.labels
        examples, encoded = self.test_split.examples, self.test_split.encoded
        if self.kind == "generation":
            view = dataclasses.replace(self.task, eval=tuple(examples))
            result = evaluate_task(
                model,
                self.tokenizer,
                view,
                prompt_ids=[e.prompt_ids for e in encoded],
                max_new_tokens=self.plan.max_new_tokens,
                stop_ids=self.fmt.stop_ids(),
            )
            loss = evaluate_loss(model, encoded, pad_token_id=self.pad)
            metrics = {**result.metrics, "eval_loss": loss, "perplexity": perplexity(loss)}
            triples = zip(result.prompts, result.predictions, result.references, strict=True)
            samples = [{"prompt": p, "prediction": q, "reference": r} for p, q, r in list(triples)[:3]]
            return TestOutput(metrics, samples, list(result.predictions), list(result.references))
        if self.kind == "encoder-classification":
            indices, loss = classify(model, encoded, self.pad)
            shown = [ex.text or "" for ex in examples]
        else:
            indices, loss = score_label_words(model, self.tokenizer, encoded, labels, pad_token_id=self.pad)
            shown = [ex.prompt for ex in examples]
        references = [labels.index(str(ex.label)) for ex in examples]
        metrics = {
            **classification_metrics([labels[i] for i in indices], [labels[i] for i in references], labels),
            "eval_loss": loss,
        }
        if self.kind == "causal-classification":
            metrics["perplexity"] = perplexity(loss)
        samples = [
            {"prompt": s, "prediction": labels[p], "reference": labels[r]}
            for s, p, r in zip(shown[:3], indices, references, strict=False)
        ]
        return TestOutput(metrics, samples, list(indices), references)

    # ---- what the statistics resample ------------------------------------------------------
    def metric_function(self, output: dict[str, Any], metric: str) -> Callable[[np.ndarray], float]:
        """``metric`` of a resample of the test examples (given their indices) of a stored
        :class:`TestOutput`."""
        return metric_function(output, metric, self.kind, len(self.task.labels), self.task.score)


def metric_function(
    output: dict[str, Any],
    metric: str,
    kind: str,
    num_labels: int,
    scorer: Callable[[list[str], list[str]], dict[str, float]] | None = None,
) -> Callable[[np.ndarray], float]:
    """See :meth:`Session.metric_function`: per-example arrays where the metric is a mean (or
    BLEU's summed statistics); else the task's ``scorer`` rerun on the resample."""
    if kind != "generation":
        predicted = np.asarray(output["predictions"])
        references = np.asarray(output["references"])
        if metric == "accuracy":
            correct = (predicted == references).astype(float)
            return lambda idx: float(correct[idx].mean())
        if metric == "macro_f1":
            return lambda idx: macro_f1_indices(predicted[idx], references[idx], num_labels)
        raise ValueError(f"--metric {metric!r}: classification runs measure accuracy and macro_f1")
    predictions, refs = output["predictions"], output["references"]
    if metric == "bleu":
        stats = bleu_statistics(predictions, refs)
        return lambda idx: bleu_from_statistics(stats[idx])
    scores = example_scores(predictions, refs)
    if metric in scores:
        values = scores[metric]
        return lambda idx: float(values[idx].mean())
    if scorer is None:
        raise ValueError(f"--metric {metric!r}: no per-example form and no task scorer to recompute it")
    task_scorer = scorer
    return lambda idx: float(task_scorer([predictions[i] for i in idx], [refs[i] for i in idx])[metric])


def binary_outcomes(output: dict[str, Any], metric: str, kind: str) -> list[bool] | None:
    """0/1 per test example where the metric is a mean of them (McNemar applies), else None."""
    if kind != "generation" and metric == "accuracy":
        return [p == r for p, r in zip(output["predictions"], output["references"], strict=True)]
    if kind == "generation" and metric == "exact_match":
        return [
            p.strip() == r.strip() for p, r in zip(output["predictions"], output["references"], strict=True)
        ]
    return None
