"""Logits only where the loss is: the language-model head and the cross-entropy computed at the
supervised positions alone, in chunks over positions.

A plain causal-LM loss materialises ``batch x seq x vocab`` logits, their fp32 log-softmax and,
in the backward pass, two gradients of that size (SmolLM2's 49,152-token vocabulary makes that
~0.4 GiB at batch 4 x 128), although with completion-only or assistant-only labels most
positions are never scored. Here the model runs up to its output head; a forward pre-hook on
``get_output_embeddings()`` (the one seam every transformers causal LM has) takes the head's
input and hands the head an empty slice instead, so no logits are made. The hidden states of the
positions whose next token is supervised are gathered, and :func:`linear_cross_entropy` applies
the head to them :data:`CHUNK_ELEMENTS` logits at a time: each chunk's softmax becomes its
gradient at once (``softmax - onehot``), which is multiplied into the hidden-state gradient (and
the head weight's, when it trains) before the next chunk, so at most one chunk of logits exists
at any time, in the forward and in the backward pass. The result equals the plain path up to
floating-point summation order.

A model whose head is not a plain ``nn.Linear`` (an adapted or trained-in-full ``lm_head``), or
that post-processes its logits (soft-capping, logit scaling, a non-zero ``final_logits_bias``
as in some BART-family models), keeps the plain path.

Encoder-decoders (T5, BART) take the same path on their decoder: the batch's ``input_ids`` and
``attention_mask`` go to the encoder, the decoder reads the labels shifted right behind the
model's ``decoder_start_token_id`` (:func:`decoder_inputs`, what transformers does with
``labels``), and the head runs at the labelled decoder positions only; the targets are the
labels themselves, with no shift (:func:`aligned_targets`). T5's scaling of the decoder output
before a tied head happens before the head is called, so the captured input already has it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# logits per chunk (positions x vocab): 4M fp32 values = 16 MiB per chunk-sized temporary
CHUNK_ELEMENTS = 4 * 2**20
# config fields of models that change their logits after the head (Gemma 2/3, Cohere, Granite)
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` (or the model an adapter wraps) is an encoder-decoder (T5, BART)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """An encoder-decoder's decoder input for ``labels``: shifted one position right behind the
    ``decoder_start_token_id``, -100 replaced by the pad id (transformers' ``shift_tokens_right``)."""
    config = getattr(model, "config", None)
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if start is None or pad is None:
        raise ValueError(
            f"{type(model).__name__}: its config has no decoder_start_token_id / pad_token_id; set them "
            "to train it as an encoder-decoder"
        )
    shifted = labels.new_full(labels.shape, int(pad))
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = int(start)
    return shifted.masked_fill(shifted == IGNORE_INDEX, int(pad))


def model_inputs(
    model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The forward's arguments for scoring ``labels``: ``batch`` itself, plus the decoder's
    input for an encoder-decoder."""
    if not is_encoder_decoder(model):
        return batch
    return {**batch, "decoder_input_ids": decoder_inputs(model, labels)}


def aligned_targets(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The target of each output position: the next label for a causal LM (its last position
    predicts nothing, so the result is one shorter), the label itself for an encoder-decoder."""
    return labels if is_encoder_decoder(model) else labels[:, 1:]


def aligned(model: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Per-position outputs (hidden states or logits) cut to :func:`aligned_targets`' positions."""
    return values if is_encoder_decoder(model) else values[:, :-1]


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when the selective path can replace it, else None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear:
        return None
    config = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            return None
    # BART-family models add a bias buffer after the head; zero (bart-base's) changes nothing
    bias = getattr(model, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor) and bool(bias.any()):
        return None
    return head


@contextlib.contextmanager
def capture_head_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """For the span of the block, calls of ``head`` record their input (into the yielded list)
    and compute nothing: the head sees a zero-length slice of positions."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        captured.append(hidden)
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matrix product runs in, as ``F.linear`` would pick it: the autocast
    dtype inside an autocast region, else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def chunk_positions(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk,
    with the gradients made in the forward pass (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        dtype: torch.dtype,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        need_h, need_w, need_b = needs
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if need_b and bias is not None
            else None
        )
        step = chunk_positions(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h = hidden[start : start + step].to(dtype)
            t = targets[start : start + step]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # d(sum of CE)/d(logits) = softmax - onehot(target)
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            low = grad.to(dtype)
            if grad_h is not None:
                grad_h[start : start + step] = (low @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (low.t() @ h).float()
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` (``hidden``: positions x width)
    against ``targets``, never holding more than one chunk of logits. ``reduction="sum"`` is
    differentiable (for training); ``"none"`` gives each position's loss (no gradient)."""
    dtype = compute_dtype(hidden, weight)
    if reduction == "none":
        with torch.no_grad():
            out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
            step = chunk_positions(weight.shape[0])
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], step):
                logits = F.linear(hidden[start : start + step].to(dtype), w, b).float()
                t = targets[start : start + step]
                out[start : start + step] = torch.logsumexp(logits, -1) - logits.gather(1, t[:, None])[:, 0]
            return out
    if reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    with torch.autocast(hidden.device.type, enabled=False):
        result: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype, needs)
    return result


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 at position t, over labels that are not -100."""
    shifted = labels[:, 1:]
    if not bool((shifted != IGNORE_INDEX).any()):
        raise ValueError("batch has no completion tokens to learn from (all labels are -100)")
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX
    )


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting token t+1 at position t over labels that are not -100
    (0 when there are none): divided by the global batch's token count by the caller."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def hidden_and_head(
    forward_module: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[Any, torch.Tensor | None, nn.Linear | None]:
    """Run ``forward_module(**batch)`` (``model`` or a wrapper of it) and return (its output,
    the hidden states its head would have scored, the head); the hidden states and the head
    are None when the model keeps the plain path (then the output has the logits)."""
    head = output_head(model)
    if head is None:
        return forward_module(**batch), None, None
    with capture_head_input(head) as captured:
        out = forward_module(**batch)
    if len(captured) != 1:
        # the model did not call its head once as a module: run it plainly
        return forward_module(**batch), None, None
    return out, captured[0], head


def supervised_loss_sum(
    forward_module: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not -100 (an encoder-decoder's
    decoder targets), with the head applied at those positions only (see the module
    docstring); the plain path where it must."""
    out, hidden, head = hidden_and_head(forward_module, model, model_inputs(model, batch, labels))
    targets = aligned_targets(model, labels)
    if hidden is None or head is None:
        logits = aligned(model, out.logits)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    mask = targets != IGNORE_INDEX
    return linear_cross_entropy(aligned(model, hidden)[mask], head.weight, head.bias, targets[mask])


@torch.no_grad()
def token_losses(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Each target's cross-entropy, shaped like :func:`aligned_targets` (0 where the label is
    -100), with the head applied at the labelled positions only."""
    out, hidden, head = hidden_and_head(model, model, model_inputs(model, batch, labels))
    targets = aligned_targets(model, labels)
    mask = targets != IGNORE_INDEX
    losses = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    if hidden is None or head is None:
        logits = aligned(model, out.logits).float()
        losses[mask] = F.cross_entropy(logits[mask], targets[mask], reduction="none")
    else:
        losses[mask] = linear_cross_entropy(
            aligned(model, hidden)[mask], head.weight, head.bias, targets[mask], reduction="none"
        )
    return losses
