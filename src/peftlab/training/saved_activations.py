"""Activation outputs recomputed in the backward pass instead of kept from the forward pass.

A gated MLP (Llama, Mistral, Qwen, Gemma: ``down(act(gate(x)) * up(x))``) leaves three
``batch x seq x intermediate`` tensors to autograd: ``gate(x)``, which the activation keeps for
its own gradient, and ``act(gate(x))`` and ``up(x)``, which the product keeps for the gradient
of the other factor. The middle one is a cheap elementwise function of the first, so keeping it
is not needed: while :func:`recomputed_activations` is active, a forward hook on every stateless
activation module notes which tensor it made from which input, and a
``torch.autograd.graph.saved_tensors_hooks`` pack hook stores such an output as (module, input)
instead; the backward pass recomputes it from the input, which autograd keeps anyway. The
recomputed tensor is bit-identical (same function, same input), and one of the three MLP tensors
per layer is freed as soon as the product is made: ~90 MiB for SmolLM2-135M at batch 4 x 128 in
fp32, for every method and full fine-tuning. Where autograd keeps a view of the output instead
(``down(act(up(x)))`` in full fine-tuning: ``nn.Linear`` keeps its 3-d input flattened, as in
GPT-NeoX, BERT, GPT-2), the view is taken again of the recomputed tensor.

Only modules known to be pure functions of their one input take part: the activation classes of
``torch.nn`` and ``transformers.activations`` without parameters, not in place, not random
(``RReLU``); and only where autograd keeps the input anyway (SiLU, GELU: not Tanh or Sigmoid,
which keep their output) and the output has the input's dtype (autocast did not change it).
Inside an activation-checkpointed region checkpointing's own hooks take precedence, so there
this changes nothing.

A second saving, :func:`unexpanded_kv_heads`: with grouped-query attention (Llama 3, Mistral,
Qwen, SmolLM2: fewer key/value heads than query heads) transformers' ``sdpa`` attention copies
each key/value head to every query head of its group (``repeat_kv``) whenever the batch has an
attention mask, that is whenever a row is padded, and autograd keeps those copies: two
``batch x heads x seq x head_dim`` tensors per layer where the unexpanded ones are a fraction of
that (~70 MiB for SmolLM2-135M at batch 4 x 128 in fp32, the difference between LoRA / full
fine-tuning peak 0.51 and 0.48 with ``peftlab train`` on padded rows). It does so because on CUDA
a masked grouped SDPA falls back to the math kernel; PyTorch's CPU kernel runs it as it is
(tested equal within fp32 rounding, and no slower), so on the CPU the training loop asks
transformers for it through transformers' own switch, ``TRANSFORMERS_SDPA_FORCE_GQA``, for each
forward and backward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# the modules whose activation classes are pure elementwise (or row-wise) functions
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")
_RANDOM = (nn.RReLU,)


@dataclasses.dataclass(frozen=True)
class _Recompute:
    module: nn.Module
    input: torch.Tensor
    version: int
    # set when autograd kept a view of the output (``nn.Linear`` on a 3-d input keeps its input
    # flattened to 2-d): the view's size, stride and storage offset
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None = None


def activation_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` whose outputs :func:`recomputed_activations` may recompute."""
    found = []
    for module in model.modules():
        if type(module).__module__ not in _ACTIVATION_MODULES or isinstance(module, _RANDOM):
            continue
        if getattr(module, "inplace", False) or next(module.parameters(recurse=False), None) is not None:
            continue
        found.append(module)
    return found


def _unpack(saved: Any) -> Any:
    if not isinstance(saved, _Recompute):
        return saved
    if saved.input._version != saved.version:
        raise RuntimeError(
            "an activation's input was modified in place after the forward pass; its output cannot be "
            "recomputed for the backward pass"
        )
    with torch.no_grad():
        output = saved.module(saved.input)
    if saved.view is not None:
        return output.as_strided(*saved.view)
    return output


@contextlib.contextmanager
def recomputed_activations(model: nn.Module) -> Iterator[None]:
    """For the forward pass run inside the block, autograd keeps the inputs of ``model``'s
    activation modules rather than their outputs (see the module docstring)."""
    modules = activation_modules(model) if torch.is_grad_enabled() else []
    if not modules:
        yield
        return
    made: dict[int, tuple[weakref.ref[torch.Tensor], _Recompute]] = {}
    kept: dict[int, weakref.ref[torch.Tensor]] = {}  # tensors autograd saved in this forward pass

    def alive(table: dict[int, Any], tensor: torch.Tensor) -> weakref.ref[torch.Tensor]:
        key = id(tensor)
        return weakref.ref(tensor, lambda _ref: table.pop(key, None))

    def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0] if len(inputs) == 1 else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad or output.dtype != x.dtype or output.shape != x.shape:
            return
        if output.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return  # computed in place
        ref = kept.get(id(x))
        if ref is None or ref() is not x:
            return  # the activation's backward does not keep its input: keeping it here would cost
        made[id(output)] = (alive(made, output), _Recompute(module, x, x._version))

    def pack(tensor: torch.Tensor) -> Any:
        entry = made.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        base = tensor._base
        entry = made.get(id(base)) if base is not None else None
        if entry is not None and entry[0]() is base:
            view = (tuple(tensor.size()), tuple(tensor.stride()), int(tensor.storage_offset()))
            return dataclasses.replace(entry[1], view=view)
        if id(tensor) not in kept:
            kept[id(tensor)] = alive(kept, tensor)
        return tensor

    handles = [m.register_forward_hook(record) for m in modules]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        made.clear()
        kept.clear()


# transformers' switch (``integrations/sdpa_attention.py``, ``use_gqa_in_sdpa``): "1" runs grouped
# SDPA with ``enable_gqa=True`` even with an attention mask, instead of repeating the key/value heads
FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
# SDPA's enable_gqa came with torch 2.5
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def grouped_sdpa_on_cpu(model: nn.Module) -> bool:
    """Whether ``model`` runs transformers' ``sdpa`` attention with grouped key/value heads on
    the CPU, where asking for unexpanded key/value heads with a mask saves memory."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not _SDPA_HAS_GQA:
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or not 0 < kv_heads < heads:
        return False
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cpu"


@contextlib.contextmanager
def unexpanded_kv_heads(model: nn.Module) -> Iterator[None]:
    """For the passes run inside the block on the CPU with grouped-query attention, keep
    key/value heads unexpanded under an attention mask too (see the module docstring). Run the
    backward pass inside it as well: activation checkpointing recomputes the forward pass there,
    and must save tensors of the shapes it saved the first time. A ``TRANSFORMERS_SDPA_FORCE_GQA``
    the user set is left as it is."""
    if FORCE_GQA_ENV in os.environ or not grouped_sdpa_on_cpu(model):
        yield
        return
    os.environ[FORCE_GQA_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA_ENV, None)
