"""The training-memory model: what one training step holds, per method and precision.

Frozen weights at the precision's size; what trains (adapters, or every weight in full
fine-tuning) in fp32 with fp32 gradients and AdamW state; activations of one batch by the
formula in :data:`ACTIVATION_FORMULA`, with the output head's logits as the chunked head
(:mod:`peftlab.training.lm_head`) makes them. ``peftlab count`` reports it, ``peftlab train``
and ``peftlab compare`` size their sequence lengths with it, and compare puts it beside each
method's measured peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.core.injection import is_linear, output_head_names
from peftlab.training.lm_head import chunk_positions

GIB = 1024**3

# Bytes per frozen parameter (and per activation element) for each training precision, as
# peftlab trains (peftlab.devices): bf16 is mixed precision, the frozen weights in bf16 and
# everything that trains (adapters, or every weight in full fine-tuning: fp32 master weights)
# in fp32 with fp32 gradients; fp16 has the same sizes.
PRECISIONS: dict[str, int] = {"fp32": 4, "bf16": 2}
TRAINED_BYTES = 4  # a trained parameter and its gradient are fp32 in every precision
ADAMW_STATE_BYTES = 2 * 4  # exp_avg and exp_avg_sq, fp32, per trainable parameter

# Korthikanti et al. 2022 (arXiv:2205.05198), eq. 2: a transformer layer stores
# s*b*h*(34 + 5*a*s/h) bytes of activations at 16-bit without recomputation; the 5*a*s/h
# term is the attention-score matrix, which memory-efficient attention (SDPA/flash) never
# stores, so it is left out.
ACTIVATION_BYTES_PER_ELEMENT_16BIT = 34
ACTIVATION_FORMULA = (
    "L*b*s*h*34 bytes at 16-bit (x2 in fp32) [Korthikanti et al. 2022, arXiv:2205.05198, "
    "without the s^2 attention-score term: memory-efficient attention] + 2 chunks of fp32 "
    "logits (peftlab applies the output head at supervised positions only, "
    "min(b*s, C) positions at a time, C*V = 4M values); no activation checkpointing; the same "
    "for every method, since backward still runs through every layer"
)


@dataclass(frozen=True)
class ActivationAssumption:
    """The shapes the activation estimate assumes: batch, sequence and the model's sizes."""

    batch_size: int
    seq_len: int
    num_layers: int
    hidden_size: int
    output_size: int  # V: width of the output head (vocabulary), 0 without one

    def bytes(self, param_bytes: int) -> int:
        tokens = self.batch_size * self.seq_len
        per_layer = tokens * self.hidden_size * ACTIVATION_BYTES_PER_ELEMENT_16BIT * param_bytes // 2
        # the chunked head (peftlab.training.lm_head): a chunk of logits and its gradient
        positions = min(tokens, chunk_positions(self.output_size)) if self.output_size else 0
        return self.num_layers * per_layer + 2 * positions * self.output_size * 4


def activation_assumption(
    config: Any, model: nn.Module, batch_size: int, seq_len: int
) -> ActivationAssumption:
    if getattr(config, "is_encoder_decoder", False):
        # T5 names them num_layers/num_decoder_layers, BART encoder_layers/decoder_layers
        enc = int(getattr(config, "encoder_layers", 0) or getattr(config, "num_layers", 0) or 0)
        dec = int(getattr(config, "decoder_layers", 0) or getattr(config, "num_decoder_layers", 0) or enc)
        layers = enc + dec
    else:
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    # a classifier's few logits are negligible; a vocabulary's are not
    out = int(getattr(head, "out_features", 0) or 0)
    return ActivationAssumption(batch_size, seq_len, layers, int(getattr(config, "hidden_size", 0) or 0), out)


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory in bytes for one precision."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }


def memory_estimates(trainable: int, total: int, acts: ActivationAssumption) -> dict[str, MemoryEstimate]:
    """Per precision: frozen weights at its size, trained weights, gradients and AdamW state in
    fp32, activations at its size (see :data:`PRECISIONS`)."""
    return {
        name: MemoryEstimate(
            weights=(total - trainable) * nbytes + trainable * TRAINED_BYTES,
            gradients=trainable * TRAINED_BYTES,
            optimizer=trainable * ADAMW_STATE_BYTES,
            activations=acts.bytes(nbytes),
        )
        for name, nbytes in PRECISIONS.items()
    }


def quantized_estimate(
    trainable: int, total: int, quantizable: int, bits: float, acts: ActivationAssumption
) -> MemoryEstimate:
    """A quantized base (``--quantize``): its linear layers at ``bits`` per weight (scales
    included), the rest of the frozen weights (embeddings, norms, the output head) and the
    activations at bf16, the compute dtype; adapters, gradients and AdamW state in fp32."""
    frozen_other = total - trainable - quantizable
    return MemoryEstimate(
        weights=math.ceil(quantizable * bits / 8) + frozen_other * 2 + trainable * TRAINED_BYTES,
        gradients=trainable * TRAINED_BYTES,
        optimizer=trainable * ADAMW_STATE_BYTES,
        activations=acts.bytes(2),
    )


def quantizable_params(model: nn.Module) -> int:
    """Weights bitsandbytes would quantize: every linear layer's but the output head's (as
    :func:`peftlab.models.load_base_model` quantizes)."""
    heads = output_head_names(model)
    return sum(m.weight.numel() for name, m in model.named_modules() if is_linear(m) and name not in heads)
