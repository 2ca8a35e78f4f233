"""What every method of one comparison shares, loaded once per worker: the frozen base model
and its tokenizer, the task, the run's sizes and precision, and the train / validation / test
splits prepared as every command prepares them (:mod:`peftlab.training.preparation`).

The validation split is carved from the training rows (stratified by label, by a fixed salt),
so the test split is never looked at before the final runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.compare.forgetting import RetainSample, load_retain_text, retain_sample
from peftlab.compare.options import CompareOptions, RunSizes, run_kind
from peftlab.compare.scoring import group_items, headline_metric
from peftlab.core.config import TaskType
from peftlab.data.tasks import Task
from peftlab.devices import Precision
from peftlab.models import load_language_model, load_sequence_classifier, load_tokenizer, model_kind
from peftlab.training.encoding import collate, pad_id
from peftlab.training.fitting import LengthPlan, PromptFormat
from peftlab.training.preparation import (
    PreparedData,
    RowEncoder,
    Split,
    carve_validation,
    load_task,
    prepare_data,
)

VALIDATION_SALT = "peftlab-compare-validation"
# what a task read from prompt/completion rows is scored by until the completions say otherwise
GENERIC_METRIC = "exact_match"


@dataclass
class ComparisonInputs:
    model: str | None  # as given (None: the embedded default)
    gguf_file: str | None
    model_kind: str  # "causal", "seq2seq" or "encoder" (peftlab.models.model_kind)
    run_kind: str  # "generation", "causal-classification" or "encoder-classification"
    task: Task
    task_type: TaskType
    metric: str  # the quality column
    metric_rule: str  # why that metric, in words for the report
    sizes: RunSizes
    precision: Precision
    base: nn.Module  # frozen
    tokenizer: Any
    fmt: PromptFormat
    data: PreparedData
    retain: RetainSample | None  # what forgetting is measured on (None: not measured)

    @property
    def plan(self) -> LengthPlan:
        return self.data.plan

    @property
    def train_split(self) -> Split:
        return self.data.splits["train"]

    @property
    def val_split(self) -> Split:
        return self.data.splits["validation"]

    @property
    def test_split(self) -> Split:
        return self.data.splits["test"]

    @property
    def test_groups(self) -> list[int]:
        """The test item of each test row: rows with the same prompt are one item (generation)."""
        return group_items([ex.prompt for ex in self.test_split.examples])

    @property
    def pad(self) -> int:
        return pad_id(self.tokenizer)

    def load_base_again(self, *, verbose: bool = False) -> nn.Module:
        """The base's weights loaded again from disk (the same as :attr:`base`, head included):
        what full fine-tuning starts from, so no copy of the base is made in memory."""
        model, _, _ = load_base(
            self.model, self.gguf_file, self.model_kind, self.task.labels, self.precision, verbose
        )
        return model

    def latency_inputs(self) -> dict[str, torch.Tensor]:
        """One batch of test rows (without labels) on the device: what latency is timed on."""
        batch = collate(self.test_split.encoded[: self.sizes.batch_size], self.pad)
        return {k: v.to(self.precision.device) for k, v in batch.items() if k != "labels"}

    def inference(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], Any]:
        """The call latency times on ``batch``: a forward pass, or for an encoder-decoder the
        encoder's pass and greedy decoding of the run's generation length, every model made to
        generate that many tokens (so each does the same work)."""
        if self.model_kind != "seq2seq":
            return lambda: model(**batch)
        steps = self.plan.max_new_tokens

        def decode() -> Any:
            return model.generate(  # type: ignore[operator]
                **batch,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad,
            )

        return decode


def load_inputs(opts: CompareOptions, *, verbose: bool = False) -> ComparisonInputs:
    """Load the base and the data for ``opts`` (resolved, see
    :func:`peftlab.compare.options.resolve_options`); nothing heavy loads before every setting
    has been checked."""
    # an unavailable device or a dtype it cannot run is refused before anything loads
    precision = Precision.resolve(opts.device, opts.dtype)
    kind = model_kind(opts.model, opts.gguf_file)
    task = load_task(
        task=opts.task,
        data=opts.data,
        eval_data=opts.eval_data,
        hf_dataset=opts.hf_dataset,
        eval_fraction=opts.eval_fraction,
        seed=0,
    )
    runs = run_kind(kind, task)
    sizes = RunSizes.resolve(opts, runs)
    chat_rows = task.info.get("kind") == "chat"
    template = opts.chat_template or ("auto" if chat_rows else "none")
    if chat_rows and kind != "encoder":
        # chat rows on a model without a chat template: refused before the weights load
        PromptFormat.resolve(
            load_tokenizer(opts.model, gguf_file=opts.gguf_file),
            template,
            chat_rows=True,
            seq2seq=kind == "seq2seq",
        )
    train, val = carve_validation(task.train, sizes.val_size, salt=VALIDATION_SALT)
    opts.check_sizes_against(len(train), sizes.batch_size)
    retain_text = load_retain_text(opts.retain_data)
    base, tokenizer, task_type = _load_base(opts, kind, task, precision, verbose)
    fmt = PromptFormat.resolve(tokenizer, template, chat_rows=chat_rows, seq2seq=kind == "seq2seq")
    test = list(task.eval[: sizes.num_eval])
    encoder = RowEncoder(tokenizer, labels=task.labels) if kind == "encoder" else RowEncoder(tokenizer, fmt)
    data = prepare_data(
        task,
        base,
        encoder,
        {"train": train, "validation": val, "test": test},
        held_out="test",
        requested_length=opts.seq_len,
        batch_size=sizes.batch_size,
        param_bytes=precision.dtype.itemsize,
        budget_bytes=sizes.memory_budget,
    )
    metric, rule = _headline(opts, task, data)
    if opts.sizes and opts.sizes[-1] > len(data.splits["train"].encoded):
        kept = len(data.splits["train"].encoded)
        raise ValueError(
            f"--sizes: {opts.sizes[-1]:,} training examples asked for, but {kept:,} of the training rows fit "
            f"within max length {data.plan.max_length}; use sizes up to {kept:,} or a larger --seq-len"
        )
    return ComparisonInputs(
        model=opts.model,
        gguf_file=opts.gguf_file,
        model_kind=kind,
        run_kind=runs,
        task=task,
        task_type=task_type,
        metric=metric,
        metric_rule=rule,
        sizes=sizes,
        precision=precision,
        base=base,
        tokenizer=tokenizer,
        fmt=fmt,
        data=data,
        retain=retain_sample(retain_text, tokenizer, kind) if retain_text is not None else None,
    )


def _headline(opts: CompareOptions, task: Task, data: PreparedData) -> tuple[str, str]:
    """The quality column and why: ``--metric``; a task's own metric where it names one (the
    built-in tasks); else the rule for the completions (exact match for labels and structured
    values, corpus BLEU for free text, see :func:`peftlab.compare.scoring.headline_metric`)."""
    if opts.metric:
        return opts.metric, "given by --metric"
    if task.metric != GENERIC_METRIC:
        return task.metric, f"the {task.name} task's own metric"
    return headline_metric([ex.completion for ex in data.splits["test"].examples], task.labels)


def _load_base(
    opts: CompareOptions, kind: str, task: Task, precision: Precision, verbose: bool
) -> tuple[nn.Module, Any, TaskType]:
    return load_base(opts.model, opts.gguf_file, kind, task.labels, precision, verbose)


def load_base(
    model: str | None,
    gguf_file: str | None,
    kind: str,
    labels: tuple[str, ...],
    precision: Precision,
    verbose: bool,
) -> tuple[nn.Module, Any, TaskType]:
    """The frozen base model, its tokenizer and the adapters' task type. The encoder's new
    classification head is initialised from a fixed seed, so every load gives the same one."""
    torch.manual_seed(0)
    if kind == "encoder":
        base, tokenizer = load_sequence_classifier(
            model or "minilm", labels, dtype=precision.dtype, device=precision.device, verbose=verbose
        )
        task_type = TaskType.SEQ_CLS
    else:
        base, tokenizer = load_language_model(
            model,
            kind=kind,
            gguf_file=gguf_file,
            dtype=precision.dtype,
            device=precision.device,
            verbose=verbose,
        )
        task_type = TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tokenizer, task_type
