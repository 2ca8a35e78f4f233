"""What tuning cost the base model on text unlike the task: forgetting, per method.

A sample of retain passages (:mod:`peftlab.data.retain`: general English prose by default,
``--retain-data FILE`` for the user's own) is scored by the untouched base and by each tuned
model, passage by passage:

- a language model: the mean next-token loss over the passages' tokens, tuned minus base (nats
  per token; > 0: the tuned model predicts general text worse), as HF PEFT's method comparison
  reports forgetting (an encoder-decoder reads each passage and is scored on reconstructing it
  as its decoder's target);
- an encoder with a new classification head, which has no language-model loss: the drift of its
  sentence representations, 1 - the mean cosine similarity between the tuned and the base
  model's mean-pooled last hidden states (0: unchanged).

The 95% interval is a percentile bootstrap over passages (:mod:`peftlab.compare.stats`). The
untouched base scores 0 by construction (the same passages through the same weights).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.compare.stats import resample_indices
from peftlab.data.retain import RetainText, general_prose, read_retain_file
from peftlab.devices import Precision, device_of
from peftlab.training.encoding import Encoded, collate
from peftlab.training.lm_head import IGNORE_INDEX, token_losses

PASSAGES = 64  # passages scored: enough for an interval, a few seconds per method on a CPU
PASSAGE_TOKENS = 128  # each passage cut to this many tokens
MIN_TOKENS = 8
BATCH = 4
NONE = "none"  # --retain-data none: forgetting not measured
ENV_VAR = "PEFTLAB_RETAIN_DATA"  # a default --retain-data for every run


@dataclass(frozen=True)
class RetainSample:
    """The passages as the model reads them (all of a passage's tokens are scored)."""

    source: str
    encoded: tuple[Encoded, ...]
    kind: str  # "loss" (language models) or "drift" (encoders)

    def describe(self) -> str:
        tokens = sum(len(e.input_ids) for e in self.encoded)
        return f"{len(self.encoded)} passages ({tokens:,} tokens) of {self.source}"


def load_retain_text(retain_data: str | None) -> RetainText | None:
    """The passages ``--retain-data`` names (None: ``$PEFTLAB_RETAIN_DATA`` when set, else the
    default general prose; ``none``: not measured, None returned)."""
    chosen = retain_data if retain_data is not None else os.environ.get(ENV_VAR) or None
    if chosen == NONE:
        return None
    return general_prose() if chosen is None else read_retain_file(chosen)


def retain_sample(text: RetainText, tokenizer: Any, model_kind: str) -> RetainSample:
    """The first :data:`PASSAGES` passages of at least :data:`MIN_TOKENS` tokens, each cut to
    :data:`PASSAGE_TOKENS`."""
    encoded: list[Encoded] = []
    for passage in text.passages:
        ids = list(tokenizer(passage, truncation=True, max_length=PASSAGE_TOKENS)["input_ids"])
        if len(ids) >= MIN_TOKENS:
            # an encoder-decoder reads the passage and is scored reconstructing it (BART's
            # denoising objective without the noise)
            encoded.append(Encoded(ids, ids, seq2seq=model_kind == "seq2seq"))
        if len(encoded) == PASSAGES:
            break
    if len(encoded) < 2:
        raise ValueError(
            f"{text.source}: fewer than 2 passages of {MIN_TOKENS} tokens or more; give more text "
            "(--retain-data), or --retain-data none to skip forgetting"
        )
    return RetainSample(text.source, tuple(encoded), "drift" if model_kind == "encoder" else "loss")


@torch.no_grad()
def passage_losses(model: nn.Module, sample: RetainSample, pad: int, precision: Precision) -> np.ndarray:
    """(passages, 2): each passage's summed next-token loss and the number of tokens scored."""
    out = np.zeros((len(sample.encoded), 2))
    for start, batch, labels in _batches(model, sample, pad):
        if sample.encoded[0].seq2seq:
            with precision.autocast():
                losses = token_losses(model, batch, labels)
            out[start : start + len(labels), 0] = losses.sum(dim=1).cpu().numpy()
            out[start : start + len(labels), 1] = (labels != IGNORE_INDEX).sum(dim=1).cpu().numpy()
            continue
        with precision.autocast():
            logits = model(**batch).logits.float()
        shifted = labels[:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
        )
        out[start : start + len(labels), 0] = losses.sum(dim=1).cpu().numpy()
        out[start : start + len(labels), 1] = (shifted != IGNORE_INDEX).sum(dim=1).cpu().numpy()
    return out


@torch.no_grad()
def passage_embeddings(model: nn.Module, sample: RetainSample, pad: int, precision: Precision) -> np.ndarray:
    """(passages, hidden): each passage's mean-pooled last hidden state."""
    rows = []
    for _, batch, _ in _batches(model, sample, pad):
        with precision.autocast():
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1)).cpu().numpy())
    return np.concatenate(rows)


def _batches(model: nn.Module, sample: RetainSample, pad: int) -> Any:
    """(first passage index, inputs on the model's device, labels) per batch, in eval mode."""
    device, was = device_of(model), model.training
    model.eval()
    try:
        for start in range(0, len(sample.encoded), BATCH):
            batch = {k: v.to(device) for k, v in collate(sample.encoded[start : start + BATCH], pad).items()}
            labels = batch.pop("labels")
            yield start, batch, labels
    finally:
        model.train(was)


def base_scores(model: nn.Module, sample: RetainSample, pad: int, precision: Precision) -> list[list[float]]:
    """What the untouched base gives, kept once per comparison: per-passage loss sums and token
    counts (a language model) or pooled embeddings (an encoder)."""
    if sample.kind == "loss":
        return passage_losses(model, sample, pad, precision).tolist()  # type: ignore[no-any-return]
    return passage_embeddings(model, sample, pad, precision).tolist()  # type: ignore[no-any-return]


def tuned_scores(
    model: nn.Module, sample: RetainSample, base: Sequence[Sequence[float]], pad: int, precision: Precision
) -> list[float] | list[list[float]]:
    """Per passage, what a tuned model gives against the base: loss sums and token counts, or
    the cosine similarity of its pooled embedding to the base's."""
    if sample.kind == "loss":
        return passage_losses(model, sample, pad, precision).tolist()  # type: ignore[no-any-return]
    tuned = passage_embeddings(model, sample, pad, precision)
    reference = np.asarray(base, dtype=float)
    cosine = (tuned * reference).sum(1) / (np.linalg.norm(tuned, axis=1) * np.linalg.norm(reference, axis=1))
    return cosine.tolist()  # type: ignore[no-any-return]


def forgetting(kind: str, base: Sequence[Any], tuned: Sequence[Any]) -> dict[str, float | str | int]:
    """The forgetting figure with its 95% bootstrap interval over passages: the change in mean
    token loss (``kind`` "loss"), or 1 - mean cosine similarity ("drift")."""
    draws = resample_indices(len(tuned))
    if kind == "loss":
        b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)

        def value(idx: np.ndarray) -> float:
            return float(t[idx, 0].sum() / t[idx, 1].sum() - b[idx, 0].sum() / b[idx, 1].sum())

        unit = "change in mean token loss (nats/token)"
    else:
        cos = np.asarray(tuned, dtype=float)

        def value(idx: np.ndarray) -> float:
            return float(1.0 - cos[idx].mean())

        unit = "1 - mean cosine similarity of pooled embeddings"
    values = np.array([value(row) for row in draws])
    return {
        "value": value(np.arange(len(tuned))),
        "ci_low": float(np.quantile(values, 0.025)),
        "ci_high": float(np.quantile(values, 0.975)),
        "passages": len(tuned),
        "measure": unit,
    }
