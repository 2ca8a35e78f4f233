"""Classification for each model kind, and held-out losses.

Encoders (BERT-style, e.g. MiniLM) get a sequence-classification head: logits over the labels
from the pooled first token, trained with cross-entropy. The head is new, so an adapter run trains
it in full (``TaskType.SEQ_CLS`` puts it in ``modules_to_save``); full fine-tuning trains it with
everything else. They train in the shared loop of :mod:`peftlab.training.loop` through
:class:`ClassifierAsNextToken`.

Causal LMs classify with label words: they learn the completion ``" <label>"`` after a prompt that
lists the labels, and at evaluation every label is scored by the log-likelihood of its tokens
after the prompt; the most likely label is the prediction. Unlike free generation, every
prediction is a label and the score does not depend on how the model would go on after it.
Encoder-decoders classify the same way, T5's: the prompt is the encoder's input and each label's
tokens the decoder's targets, scored through the decoder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.tasks import Example
from peftlab.training.encoding import Encoded, collate
from peftlab.training.lm_head import (
    IGNORE_INDEX,
    hidden_and_head,
    is_encoder_decoder,
    linear_cross_entropy,
    token_losses,
)

# where encode_texts puts the class index: the shared loop pairs label position t + 1 with the
# logits at position t (next-token shift), and ClassifierAsNextToken puts the class logits at 0
CLASS_POSITION = 1


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the span of the block, its mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _batches(
    encoded: Sequence[Encoded], pad_token_id: int, batch_size: int, device: torch.device
) -> Iterator[tuple[list[int], list[Encoded], dict[str, torch.Tensor], torch.Tensor]]:
    """Batches of similar length: their indices in ``encoded``, their rows, the padded inputs
    on ``device`` and their labels."""
    for indices in length_batches(encoded, batch_size):
        chunk = [encoded[i] for i in indices]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
        yield indices, chunk, batch, batch.pop("labels")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_texts(
    tokenizer: Any, examples: Sequence[Example], labels: Sequence[str], max_length: int
) -> list[Encoded]:
    """Token ids of each example's text (truncated to ``max_length``), with the class index at
    label position :data:`CLASS_POSITION` and -100 elsewhere, so :func:`training.collate` pads them."""
    out = []
    for ex in examples:
        if ex.text is None or ex.label is None or ex.label not in labels:
            raise ValueError(f"not a classification example with a label from {list(labels)}: {ex!r}")
        ids = list(tokenizer(ex.text, truncation=True, max_length=max(max_length, 2))["input_ids"])
        if len(ids) <= CLASS_POSITION:
            raise ValueError(
                f"{ex.text!r} encodes to {len(ids)} token(s); the tokenizer should add [CLS]/[SEP]"
            )
        targets = [IGNORE_INDEX] * len(ids)
        targets[CLASS_POSITION] = list(labels).index(ex.label)
        out.append(Encoded(ids, targets))
    return out


class ClassifierAsNextToken(nn.Module):
    """A sequence classifier seen by the causal-LM training loop: its (batch, labels) logits
    become position 0 of (batch, seq, labels) logits (the rest zeros), which the loop's
    next-token shift pairs with the class index at label position 1 (:func:`encode_texts`).
    The loop's token-mean cross-entropy is then exactly the classifier's mean over the batch."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, **inputs: Any) -> Any:
        out = self.classifier(**inputs)
        logits = out.logits
        width = inputs["input_ids"].shape[1]
        rest = logits.new_zeros(logits.shape[0], width - 1, logits.shape[-1])
        out.logits = torch.cat([logits.unsqueeze(1), rest], dim=1)
        return out


@torch.no_grad()
def classify(
    model: nn.Module, data: Sequence[Encoded], pad_token_id: int, batch_size: int = 32
) -> tuple[list[int], float]:
    """(predicted class index per example, mean cross-entropy) for a classification-head model."""
    was = model.training
    model.eval()
    device = _device_of(model)
    predictions = [0] * len(data)
    total = 0.0
    try:
        for rows in length_batches(data, batch_size):
            batch = {k: v.to(device) for k, v in collate([data[i] for i in rows], pad_token_id).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            total += float(F.cross_entropy(logits, labels[:, CLASS_POSITION], reduction="sum"))
            for i, p in zip(rows, logits.argmax(-1).tolist(), strict=True):
                predictions[i] = p
    finally:
        model.train(was)
    return predictions, total / len(data)


def length_batches(data: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Indices of ``data`` in batches of similar length (shortest first), so a batch pads little;
    for evaluation, where the order does not matter."""
    order = sorted(range(len(data)), key=lambda i: (len(data[i].input_ids), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _label_ids(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    ids = [list(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in labels]
    if any(not i for i in ids):
        raise ValueError(f"a label tokenizes to nothing: {dict(zip(labels, ids, strict=True))}")
    return ids


@torch.no_grad()
def score_label_words(
    model: nn.Module,
    tokenizer: Any,
    encoded: Sequence[Encoded],
    labels: Sequence[str],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> tuple[list[int], float]:
    """(most likely label index per example, mean completion loss) for a causal LM.

    ``encoded`` are the examples as training encodes them (prompt, possibly cut to fit, then the
    reference label and eos; :func:`peftlab.training.fitting.fit_examples`). A label's score is
    the sum of the log-probabilities of its tokens (``" " + label``, as in training) after the
    prompt. Each example is run once with its reference completion (which gives the loss); when
    every label is one token that run also scores all labels, else each label continuation is
    run too. The output head is applied only where a score or the loss needs it
    (:mod:`peftlab.training.lm_head`).
    """
    label_ids = _label_ids(tokenizer, labels)
    if is_encoder_decoder(model):
        return _score_label_words_seq2seq(model, encoded, label_ids, pad_token_id, batch_size)
    single = all(len(i) == 1 for i in label_ids)
    device = _device_of(model)
    predictions = [0] * len(encoded)
    total, count = 0.0, 0
    with _evaluating(model):
        for indices, chunk, batch, targets in _batches(encoded, pad_token_id, batch_size, device):
            prompts = [e.prompt_length for e in chunk]
            shifted = targets[:, 1:]
            mask = shifted != IGNORE_INDEX
            out, hidden, head = hidden_and_head(model, model, batch)
            rows = torch.arange(len(chunk), device=device)
            last = torch.tensor(prompts, device=device) - 1
            if hidden is None or head is None:
                logits = out.logits.float()
                total += float(F.cross_entropy(logits[:, :-1][mask], shifted[mask], reduction="sum"))
                at_last = logits[rows, last]
            else:
                total += float(
                    linear_cross_entropy(hidden[:, :-1][mask], head.weight, head.bias, shifted[mask])
                )
                at_last = head(hidden[rows, last]).float()
            count += int(mask.sum())
            if single:
                # the logits at the last prompt position predict the label's one token
                log_probs = at_last.log_softmax(-1)
                scores = log_probs[:, [i[0] for i in label_ids]]
            else:
                heads = [e.input_ids[:n] for e, n in zip(chunk, prompts, strict=True)]
                scores = _score_continuations(model, heads, label_ids, pad_token_id)
            for i, p in zip(indices, scores.argmax(-1).tolist(), strict=True):
                predictions[i] = p
    return predictions, total / max(count, 1)


def _score_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    pad_token_id: int,
) -> torch.Tensor:
    """(examples, labels) summed log-probabilities of each label's tokens after each prompt."""
    device = _device_of(model)
    sequences = [
        Encoded([*prompt, *ids], [IGNORE_INDEX] * len(prompt) + list(ids))
        for prompt in prompts
        for ids in label_ids
    ]
    batch = {k: v.to(device) for k, v in collate(sequences, pad_token_id).items()}
    targets = batch.pop("labels")[:, 1:]
    mask = targets != IGNORE_INDEX
    out, hidden, head = hidden_and_head(model, model, batch)
    if hidden is None or head is None:
        log_probs = out.logits[:, :-1].float().log_softmax(-1)
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1).view(len(prompts), len(label_ids))
    # each label token's log-probability, computed at the label positions only
    losses = linear_cross_entropy(
        hidden[:, :-1][mask], head.weight, head.bias, targets[mask], reduction="none"
    )
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(len(sequences), dtype=torch.float32, device=device).index_add_(0, rows, -losses)
    return sums.view(len(prompts), len(label_ids))


def _score_label_words_seq2seq(
    model: nn.Module,
    encoded: Sequence[Encoded],
    label_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int,
) -> tuple[list[int], float]:
    """:func:`score_label_words` for an encoder-decoder: each example's encoder input is run with
    its reference target (the loss) and with every label's tokens as the decoder's targets (the
    scores)."""
    device = _device_of(model)
    predictions = [0] * len(encoded)
    total, count = 0.0, 0
    with _evaluating(model):
        for indices, chunk, batch, targets in _batches(encoded, pad_token_id, batch_size, device):
            total += float(token_losses(model, batch, targets).sum())
            count += int((targets != IGNORE_INDEX).sum())
            candidates = [Encoded(e.input_ids, list(ids), seq2seq=True) for e in chunk for ids in label_ids]
            batch = {k: v.to(device) for k, v in collate(candidates, pad_token_id).items()}
            scored = batch.pop("labels")
            scores = -token_losses(model, batch, scored).sum(-1).view(len(chunk), len(label_ids))
            for i, p in zip(indices, scores.argmax(-1).tolist(), strict=True):
                predictions[i] = p
    return predictions, total / max(count, 1)
