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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.tasks import Example
from peftlab.training.loop import IGNORE_INDEX, Encoded, collate, encode_example, encode_prompt

# where encode_texts puts the class index: the shared loop pairs label position t + 1 with the
# logits at position t (next-token shift), and ClassifierAsNextToken puts the class logits at 0
CLASS_POSITION = 1


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


def fit_prompts(tokenizer: Any, examples: Sequence[Example], max_length: int) -> tuple[list[Example], int]:
    """(examples, how many were cut): a classification prompt too long for ``max_length`` tokens
    together with its completion and eos gets its text cut from the end, so the label always fits."""
    out: list[Example] = []
    cut = 0
    for ex in examples:
        room = max_length - len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) - 1
        prompt_ids = encode_prompt(tokenizer, ex.prompt)
        if len(prompt_ids) <= room or ex.text is None or ex.text not in ex.prompt:
            out.append(ex)  # fits, or not a text we can cut (encode_example then reports it)
            continue
        text_ids = list(tokenizer(ex.text, add_special_tokens=False)["input_ids"])
        keep = len(text_ids) - (len(prompt_ids) - room)
        prompt = ex.prompt
        # decoding and re-encoding can merge tokens differently: shrink until it really fits
        while keep > 0:
            prompt = ex.prompt.replace(ex.text, tokenizer.decode(text_ids[:keep]).strip(), 1)
            if len(encode_prompt(tokenizer, prompt)) <= room:
                break
            keep -= 1
        if keep <= 0:
            raise ValueError(
                f"max length {max_length} leaves no room for the text of a classification prompt; "
                "raise --seq-len"
            )
        out.append(Example(prompt, ex.completion, text=ex.text, label=ex.label))
        cut += 1
    return out, cut


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
    predictions: list[int] = []
    total = 0.0
    try:
        for start in range(0, len(data), batch_size):
            batch = {
                k: v.to(device) for k, v in collate(data[start : start + batch_size], pad_token_id).items()
            }
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            total += float(F.cross_entropy(logits, labels[:, CLASS_POSITION], reduction="sum"))
            predictions += logits.argmax(-1).tolist()
    finally:
        model.train(was)
    return predictions, total / len(data)


def _label_ids(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    ids = [list(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in labels]
    if any(not i for i in ids):
        raise ValueError(f"a label tokenizes to nothing: {dict(zip(labels, ids, strict=True))}")
    return ids


@torch.no_grad()
def score_label_words(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    max_length: int,
    pad_token_id: int,
    batch_size: int = 16,
) -> tuple[list[int], float]:
    """(most likely label index per example, mean completion loss) for a causal LM.

    A label's score is the sum of the log-probabilities of its tokens (``" " + label``, as in
    training) after the prompt. Each example is run once with its reference completion (which
    gives the loss); when every label is one token those logits also score all labels, else each
    label continuation is run too.
    """
    label_ids = _label_ids(tokenizer, labels)
    single = all(len(i) == 1 for i in label_ids)
    was = model.training
    model.eval()
    device = _device_of(model)
    predictions: list[int] = []
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            encoded = [encode_example(tokenizer, ex, max_length) for ex in chunk]
            prompt_lens = [len(encode_prompt(tokenizer, ex.prompt)) for ex in chunk]
            batch = {k: v.to(device) for k, v in collate(encoded, pad_token_id).items()}
            targets = batch.pop("labels")
            logits = model(**batch).logits.float()
            shifted = targets[:, 1:]
            total += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    shifted.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            count += int((shifted != IGNORE_INDEX).sum())
            if single:
                # the logits at the last prompt position predict the label's one token
                rows = torch.arange(len(chunk), device=device)
                last = torch.tensor(prompt_lens, device=device) - 1
                log_probs = logits[rows, last].log_softmax(-1)
                scores = log_probs[:, [i[0] for i in label_ids]]
            else:
                scores = _score_continuations(model, tokenizer, chunk, label_ids, max_length, pad_token_id)
            predictions += scores.argmax(-1).tolist()
    finally:
        model.train(was)
    return predictions, total / max(count, 1)


def _score_continuations(
    model: nn.Module,
    tokenizer: Any,
    chunk: Sequence[Example],
    label_ids: Sequence[Sequence[int]],
    max_length: int,
    pad_token_id: int,
) -> torch.Tensor:
    """(examples, labels) summed log-probabilities of each label's tokens after each prompt."""
    device = _device_of(model)
    sequences: list[Encoded] = []
    for ex in chunk:
        prompt = encode_prompt(tokenizer, ex.prompt)
        for ids in label_ids:
            if len(prompt) + len(ids) > max_length:
                raise ValueError(
                    f"prompt of {len(prompt)} tokens plus a {len(ids)}-token label exceeds "
                    f"max_length={max_length}; raise --seq-len"
                )
            sequences.append(Encoded(prompt + list(ids), [IGNORE_INDEX] * len(prompt) + list(ids)))
    batch = {k: v.to(device) for k, v in collate(sequences, pad_token_id).items()}
    targets = batch.pop("labels")[:, 1:]
    log_probs = model(**batch).logits[:, :-1].float().log_softmax(-1)
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1).view(len(chunk), len(label_ids))
