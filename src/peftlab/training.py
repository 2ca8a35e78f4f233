"""The one train/eval loop every peftlab command shares, for causal language models.

Training minimises the next-token cross-entropy on completion tokens only (prompt and padding
labels are -100), with AdamW over the parameters that require grad (adapter parameters of a
:class:`~peftlab.PeftModel`, or everything for full fine-tuning) and a linear warmup/decay
schedule. All randomness comes from the config's seed: batch order from an explicit
``torch.Generator``, dropout from a forked, seeded global RNG that is restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from peftlab.tasks import Example, Task

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + completion; ``labels`` are the ids with the prompt set to -100."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TrainConfig:
    steps: int = 30
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


@dataclass
class TrainHistory:
    """Per-step loss, wall time, learning rate and number of (non-padding) tokens."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def total_time(self) -> float:
        return sum(self.step_times)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens) / self.total_time if self.total_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_time": self.total_time, "tokens_per_second": self.tokens_per_second}


# ---- data -----------------------------------------------------------------------------


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so completions can end")
    return int(eos)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to eos (padding is masked out either way)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else _eos_id(tokenizer)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids exactly as training sees them (the tokenizer's own special tokens included)."""
    return list(tokenizer(prompt)["input_ids"])


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Prompt and completion tokenised separately, so the boundary is exact, then eos appended."""
    prompt = encode_prompt(tokenizer, example.prompt)
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    completion.append(_eos_id(tokenizer))
    if len(prompt) >= max_length:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room for the completion within "
            f"max_length={max_length}; raise max_length or shorten the prompt"
        )
    ids = (prompt + completion)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    return Encoded(ids, labels)


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_length: int = 256) -> list[Encoded]:
    return [encode_example(tokenizer, ex, max_length) for ex in examples]


def collate(
    batch: Sequence[Encoded], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(ex.input_ids)
        labels[i, cols] = torch.tensor(ex.labels)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 at position t, over labels that are not -100."""
    shifted = labels[:, 1:]
    if not bool((shifted != IGNORE_INDEX).any()):
        raise ValueError("batch has no completion tokens to learn from (all labels are -100)")
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """``steps`` batches of indices: consecutive chunks of a stream of fresh permutations."""
    stream: list[int] = []
    for _ in range(steps):
        while len(stream) < batch_size:
            stream += torch.randperm(n, generator=generator).tolist()
        yield stream[:batch_size]
        stream = stream[batch_size:]


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over the warmup, then 1 -> 0 at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout for the block without leaving the global RNG changed afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---- training -------------------------------------------------------------------------


def train(
    model: nn.Module,
    data: Sequence[Encoded],
    config: TrainConfig,
    *,
    pad_token_id: int,
    progress: bool = True,
    desc: str = "train",
) -> TrainHistory:
    """Train ``model`` in place for ``config.steps`` steps and return the history.

    Works with a :class:`~peftlab.PeftModel` (only adapter parameters require grad) and with a
    plain model (full fine-tuning): whatever requires grad is optimised, nothing else is touched.
    """
    if not data:
        raise ValueError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters: attach an adapter (get_peft_model) or call "
            "model.train_adapter(name), or unfreeze parameters for full fine-tuning"
        )
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(config.warmup_steps, config.steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    device = _device_of(model)
    history = TrainHistory()
    was_training = model.training
    model.train()
    bar = tqdm(total=config.steps, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    try:
        with _seeded_rng(config.seed, device):
            for indices in _batch_order(len(data), config.batch_size, config.steps, generator):
                start = time.perf_counter()
                batch = {
                    k: v.to(device) for k, v in collate([data[i] for i in indices], pad_token_id).items()
                }
                labels = batch.pop("labels")
                logits = model(**batch).logits
                loss = causal_lm_loss(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                value = float(loss.detach())
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                if not math.isfinite(value):
                    raise RuntimeError(
                        f"loss became {value} at step {len(history.losses) + 1}; lower the learning rate"
                    )
                history.losses.append(value)
                history.step_times.append(elapsed)
                history.learning_rates.append(lr)
                history.tokens.append(int(batch["attention_mask"].sum()))
                bar.set_postfix(
                    loss=f"{value:.3f}", tok_s=f"{history.tokens[-1] / elapsed:.0f}", refresh=False
                )
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return history


# ---- evaluation -----------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions of ``prompts`` (batched with left padding), decoded up to eos."""
    eos = _eos_id(tokenizer)
    pad = pad_id(tokenizer)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = collate([Encoded(ids, ids) for ids in chunk], pad, padding_side="left")
            generated = model.generate(  # type: ignore[operator]
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                # the model's generation_config may ask for sampling; greedy must not inherit it
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row in generated[:, batch["input_ids"].shape[1] :].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
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
) -> EvalResult:
    """Generate for the task's eval split (or its first ``max_examples``) and score it."""
    examples = list(task.eval if max_examples is None else task.eval[:max_examples])
    start = time.perf_counter()
    prompts = [ex.prompt for ex in examples]
    predictions = generate(
        model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=batch_size
    )
    references = [ex.completion for ex in examples]
    metrics = task.score(predictions, references)
    return EvalResult(metrics, prompts, predictions, references, time.perf_counter() - start)
