"""The training-memory model: what one training step holds, per method and precision.

Frozen weights at the precision's size; what trains (adapters, or every weight in full
fine-tuning) in fp32 with fp32 gradients and AdamW state; activations of one batch by the
formula in :data:`ACTIVATION_FORMULA`, with the output head's logits as the chunked head
(:mod:`peftlab.training.lm_head`) makes them. ``peftlab count`` reports it, ``peftlab train``
and ``peftlab compare`` size their sequence lengths with it, and compare puts it beside each
method's measured peak.

A :class:`MemoryPlan` is what a method trains with so that its estimate fits what the device
has (:func:`available_bytes`, or ``--max-memory``): the batch split into micro-batches whose
gradients accumulate (the same examples per optimizer step, the same gradient up to float
rounding), then activation checkpointing where the method allows it. :class:`MemoryPlanner`
makes the first plan from the estimate and the next one after an out-of-memory error
(:func:`is_out_of_memory`).
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core.injection import is_linear, output_head_names
from peftlab.models import quiet
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
# with activation checkpointing (full recomputation, ibid. section 4) a layer keeps only its
# input, 2*s*b*h bytes at 16-bit, and backward recomputes one layer's activations at a time
CHECKPOINTED_BYTES_PER_ELEMENT_16BIT = 2
ACTIVATION_FORMULA = (
    "L*b*s*h*34 bytes at 16-bit (x2 in fp32) [Korthikanti et al. 2022, arXiv:2205.05198, "
    "without the s^2 attention-score term: memory-efficient attention] + 2 chunks of fp32 "
    "logits (peftlab applies the output head at supervised positions only, "
    "min(b*s, C) positions at a time, C*V = 4M values); with activation checkpointing "
    "L*b*s*h*2 + one layer's b*s*h*34 instead; the same for every method, since backward "
    "still runs through every layer"
)


@dataclass(frozen=True)
class ActivationAssumption:
    """The shapes the activation estimate assumes: batch, sequence and the model's sizes."""

    batch_size: int
    seq_len: int
    num_layers: int
    hidden_size: int
    output_size: int  # V: width of the output head (vocabulary), 0 without one
    checkpointing: bool = False  # activation checkpointing: layers keep only their inputs

    def bytes(self, param_bytes: int) -> int:
        tokens = self.batch_size * self.seq_len
        per_layer = tokens * self.hidden_size * ACTIVATION_BYTES_PER_ELEMENT_16BIT * param_bytes // 2
        if self.checkpointing:
            kept = tokens * self.hidden_size * CHECKPOINTED_BYTES_PER_ELEMENT_16BIT * param_bytes // 2
            layers = self.num_layers * kept + per_layer  # one layer recomputed at a time
        else:
            layers = self.num_layers * per_layer
        # the chunked head (peftlab.training.lm_head): a chunk of logits and its gradient
        positions = min(tokens, chunk_positions(self.output_size)) if self.output_size else 0
        return layers + 2 * positions * self.output_size * 4


def build_meta_model(config: Any, model_cls: Any) -> nn.Module:
    """The model with every tensor on the meta device: shapes only, nothing allocated."""
    with quiet(), torch.device("meta"):
        if hasattr(model_cls, "from_config"):
            return model_cls.from_config(config)  # type: ignore[no-any-return]
        return model_cls(config)  # type: ignore[no-any-return]


def activation_assumption(
    config: Any, model: nn.Module, batch_size: int, seq_len: int, *, checkpointing: bool = False
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
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
    return ActivationAssumption(batch_size, seq_len, layers, hidden, out, checkpointing)


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


def weight_bytes(model: nn.Module) -> int:
    """Bytes ``model``'s parameters take now (what a plan counts as already in memory)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def training_estimate(
    base: nn.Module,
    trainable: int,
    total: int,
    batch_size: int,
    seq_len: int,
    *,
    mixed: bool,
    bits: float | None = None,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """One method's training memory on ``base`` (a transformers model) at one forward pass of
    ``batch_size`` x ``seq_len``: in bf16 mixed precision or fp32, or over a base quantized to
    ``bits`` per weight; with or without activation checkpointing."""
    config = base.config
    acts = activation_assumption(config, base, batch_size, seq_len, checkpointing=checkpointing)
    if bits is not None:
        return quantized_estimate(trainable, total, quantizable_params(base), bits, acts)
    return memory_estimates(trainable, total, acts)["bf16" if mixed else "fp32"]


def quantizable_params(model: nn.Module) -> int:
    """Weights bitsandbytes would quantize: every linear layer's but the output head's (as
    :func:`peftlab.models.load_base_model` quantizes)."""
    heads = output_head_names(model)
    return sum(m.weight.numel() for name, m in model.named_modules() if is_linear(m) and name not in heads)


MAX_MEMORY_HELP = (
    "GiB a method's training may take (its estimate: weights, gradients, AdamW state, "
    "activations); default: what the device has free (CUDA) or available (CPU RAM). A batch "
    "that does not fit is split into micro-batches with gradient accumulation, then trained "
    "with activation checkpointing"
)


def check_max_memory(value: Any) -> None:
    """``--max-memory``: a finite number of GiB above 0 (None: not given)."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"--max-memory {value!r}: give the GiB a method may take, a number above 0, e.g. 20")


# ---- what the device has ----------------------------------------------------------------------
def available_bytes(device: torch.device) -> int | None:
    """Memory a run could still take on ``device``: CUDA's free memory, or on the CPU the
    kernel's estimate of what can be allocated without swapping (``MemAvailable`` in
    ``/proc/meminfo``, Linux); None where neither is known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cap_device_memory(device: torch.device, limit_bytes: int) -> None:
    """On CUDA, make ``--max-memory`` a real limit: PyTorch's allocator raises out-of-memory
    beyond it (``torch.cuda.set_per_process_memory_fraction``). On the CPU nothing caps the
    process; the plan keeps to the limit by its estimate."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)


_CPU_OOM_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device running out of memory: CUDA's (and MPS's)
    ``torch.OutOfMemoryError``, Python's ``MemoryError``, or the CPU allocator's failure
    (``DefaultCPUAllocator: can't allocate memory``, raised as a RuntimeError)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _CPU_OOM_MESSAGES)


def free_device_memory(device: torch.device) -> None:
    """After an out-of-memory error: collect what nothing refers to any more and give the
    device's cached blocks back (CUDA), so the next attempt starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gib(n: int | float) -> str:
    """``n`` bytes for a person: GiB from 1 GiB up, MiB or KiB below (three figures)."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size or unit == "KiB":
            value = n / size
            return f"{value:.3g} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    raise AssertionError("unreachable")


# ---- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """How one method trains to fit: each batch of ``batch_size`` examples (per process) in
    forward/backward passes of at most ``micro_batch`` (``accumulation`` of them, the gradient
    accumulated), with or without activation checkpointing; ``needed_bytes`` is the estimate at
    that plan, ``available_bytes`` what it had to fit in (None: unknown, nothing planned).
    ``fits`` False: not even one example at a time with checkpointing fits;
    ``out_of_memory``: out-of-memory errors this method has survived."""

    batch_size: int
    micro_batch: int
    checkpointing: bool
    needed_bytes: int
    available_bytes: int | None
    fits: bool = True
    out_of_memory: int = 0

    @property
    def accumulation(self) -> int:
        return math.ceil(self.batch_size / self.micro_batch)

    def describe(self) -> str:
        """``8 x 1``, ``2 x 4 + checkpointing``: micro-batch x accumulation."""
        return f"{self.micro_batch} x {self.accumulation}" + (
            " + checkpointing" if self.checkpointing else ""
        )

    def refusal(self) -> str:
        """The row's text when the method does not fit."""
        available = "?" if self.available_bytes is None else gib(self.available_bytes)
        if self.available_bytes is not None and self.needed_bytes <= self.available_bytes:
            # the estimate fitted but the device still ran out
            return (
                "does not fit: ran out of memory at micro-batch 1"
                + (" with checkpointing" if self.checkpointing else "")
                + f" (estimated {gib(self.needed_bytes)}, {available} available)"
            )
        return f"does not fit: needs about {gib(self.needed_bytes)}, {available} available"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accumulation": self.accumulation, "shown": self.describe()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryPlan:
        return cls(
            batch_size=int(data["batch_size"]),
            micro_batch=int(data["micro_batch"]),
            checkpointing=bool(data["checkpointing"]),
            needed_bytes=int(data["needed_bytes"]),
            available_bytes=None if data.get("available_bytes") is None else int(data["available_bytes"]),
            fits=bool(data.get("fits", True)),
            out_of_memory=int(data.get("out_of_memory", 0)),
        )


# estimate(micro_batch, checkpointing) -> bytes
Estimator = Callable[[int, bool], int]


def halved(micro_batch: int) -> int:
    """The next micro-batch down: half, rounded up (8, 4, 2, 1; 6, 3, 2, 1)."""
    return max(1, math.ceil(micro_batch / 2)) if micro_batch > 1 else 1


class MemoryPlanner:
    """Plans for one method at one batch size: from its estimate (``estimate(micro_batch,
    checkpointing)`` in bytes) against ``available`` bytes, and again after each out-of-memory
    error. ``can_checkpoint``: whether the method (and the model) train under activation
    checkpointing."""

    def __init__(
        self,
        estimate: Estimator,
        batch_size: int,
        available: int | None,
        can_checkpoint: bool,
        *,
        always_checkpoint: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.estimate = estimate
        self.batch_size = batch_size
        self.available = available
        self.can_checkpoint = can_checkpoint or always_checkpoint
        self.always_checkpoint = always_checkpoint  # checkpointing is on whatever the plan (asked for)

    def _plan(self, micro: int, checkpointing: bool, fits: bool = True, ooms: int = 0) -> MemoryPlan:
        need = self.estimate(micro, checkpointing)
        return MemoryPlan(self.batch_size, micro, checkpointing, need, self.available, fits, ooms)

    def smallest(self) -> MemoryPlan:
        """One example at a time, checkpointing where allowed: the least this method can need."""
        return self._plan(1, self.can_checkpoint, fits=self.available is None)

    def first(self) -> MemoryPlan:
        """The whole batch at once if its estimate fits; else the largest micro-batch (halving)
        that fits without checkpointing; else with it; else a plan that does not fit."""
        if self.available is None:
            return self._plan(self.batch_size, self.always_checkpoint)
        if self.always_checkpoint:
            choices: tuple[bool, ...] = (True,)
        else:
            choices = (False, True) if self.can_checkpoint else (False,)
        for checkpointing in choices:
            micro = self.batch_size
            while True:
                plan = self._plan(micro, checkpointing)
                if plan.needed_bytes <= self.available:
                    return plan
                if micro == 1:
                    break
                micro = halved(micro)
        return dataclasses.replace(self.smallest(), fits=False)

    def after_out_of_memory(self, plan: MemoryPlan) -> MemoryPlan:
        """The plan after ``plan`` ran out of memory: half the micro-batch (twice the
        accumulation); at one example, checkpointing where allowed; after that, does not fit."""
        ooms = plan.out_of_memory + 1
        if plan.micro_batch > 1:
            return self._plan(halved(plan.micro_batch), plan.checkpointing, ooms=ooms)
        if self.can_checkpoint and not plan.checkpointing:
            return self._plan(1, True, ooms=ooms)
        return self._plan(1, plan.checkpointing, fits=False, ooms=ooms)
