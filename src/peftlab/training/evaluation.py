"""Held-out evaluation: the mean loss over completion tokens, and greedy generation scored by
the task's metric (prompts batched with left padding, decoded up to eos or a chat template's
end-of-turn token). An encoder-decoder's prompts are its encoder's input, batched with right
padding (BART's learned positions start at the first token), and what it generates is the
decoder's sequence after its start token."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.data.tasks import Example, Task
from peftlab.devices import Precision, device_of
from peftlab.training.encoding import Encoded, collate, encode_prompt, eos_id, num_targets, pad_id
from peftlab.training.lm_head import is_encoder_decoder, supervised_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    data: Sequence[Encoded],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    precision: Precision | None = None,
) -> float:
    """Mean cross-entropy over every completion token of ``data``, in eval mode (the head
    applied at supervised positions only), under ``precision``'s autocast when given."""
    total = sum(num_targets(ex) for ex in data)
    if total == 0:
        raise ValueError("no completion tokens to evaluate")
    device = device_of(model)
    was_training = model.training
    model.eval()
    summed = 0.0
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    try:
        with autocast:
            for start in range(0, len(data), batch_size):
                batch = {
                    k: v.to(device)
                    for k, v in collate(data[start : start + batch_size], pad_token_id).items()
                }
                labels = batch.pop("labels")
                summed += float(supervised_loss_sum(model, model, batch, labels))
    finally:
        model.train(was_training)
    return summed / total


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions of ``prompts`` (batched with left padding), decoded up to eos."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    return generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_ids: Sequence[int] = (),
    precision: Precision | None = None,
) -> list[str]:
    """Greedy completions of already encoded prompts (e.g. cut to fit), decoded up to eos or
    the first of ``stop_ids`` (a chat template's end-of-turn token), under ``precision``'s
    autocast when given."""
    eos = eos_id(tokenizer)
    stops = list(dict.fromkeys([eos, *stop_ids]))
    pad = pad_id(tokenizer)
    device = device_of(model)
    encoder_decoder = is_encoder_decoder(model)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            side = "right" if encoder_decoder else "left"
            batch = collate([Encoded(ids, ids) for ids in chunk], pad, padding_side=side)
            with autocast:
                generated = model.generate(  # type: ignore[operator]
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    # the model's generation_config may ask for sampling; greedy must not inherit it
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=stops if len(stops) > 1 else eos,
                    pad_token_id=pad,
                )
            # a decoder-only model's output repeats the prompt; a decoder's starts with its start token
            skip = 1 if encoder_decoder else batch["input_ids"].shape[1]
            for row in generated[:, skip:].tolist():
                ends = [row.index(t) for t in stops if t in row]
                if ends:
                    row = row[: min(ends)]
                outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


@dataclass
class EvalResult:
    metrics: dict[str, float]
    prompts: list[str]
    predictions: list[str]
    references: list[str]
    seconds: float


def evaluate_task(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    max_examples: int | None = None,
    batch_size: int = 16,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int | None = None,
    stop_ids: Sequence[int] = (),
    precision: Precision | None = None,
) -> EvalResult:
    """Generate for the task's eval split (or its first ``max_examples``) and score it.
    ``prompt_ids`` (one per eval example, e.g. cut to fit or rendered with a chat template)
    replace encoding the prompts, ``max_new_tokens`` the task's own generation length;
    ``stop_ids`` and ``precision`` go to :func:`generate_ids`."""
    examples = list(task.eval if max_examples is None else task.eval[:max_examples])
    start = time.perf_counter()
    prompts = [ex.prompt for ex in examples]
    ids = [encode_prompt(tokenizer, p) for p in prompts] if prompt_ids is None else list(prompt_ids)
    if len(ids) != len(examples):
        raise ValueError(f"{len(ids)} prompt_ids for {len(examples)} eval examples; give one per example")
    predictions = generate_ids(
        model,
        tokenizer,
        ids,
        max_new_tokens=max_new_tokens or task.max_new_tokens,
        batch_size=batch_size,
        stop_ids=stop_ids,
        precision=precision,
    )
    references = [ex.completion for ex in examples]
    metrics = task.score(predictions, references)
    return EvalResult(metrics, prompts, predictions, references, time.perf_counter() - start)


def evaluate_held_out(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    encoded: Sequence[Encoded],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    precision: Precision | None = None,
) -> dict[str, float]:
    """Eval loss and the task metric on held-out ``examples`` as encoded (generation continues
    each one's prompt as fitted, chat-rendered where it was), without moving the training RNG,
    so a resumed run that evaluates at other steps trains exactly the same."""
    device = device_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loss = evaluate_loss(model, encoded, pad_token_id=pad_id(tokenizer), precision=precision)
        scored = evaluate_task(
            model,
            tokenizer,
            dataclasses.replace(task, eval=tuple(examples)),
            prompt_ids=[e.prompt_ids for e in encoded],
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            precision=precision,
        )
    return {"eval_loss": loss, **scored.metrics}
