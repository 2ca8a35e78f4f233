"""Frozen bases quantized by bitsandbytes (QLoRA: Dettmers et al., 2023, arXiv:2305.14314).

A quantized base holds ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4 weights in blocks of 64, one
absmax scale per block; "double quantisation" stores those scales in 8 bits) or
``Linear8bitLt`` (int8 rows with one scale per row) in place of ``nn.Linear``. Adapters wrap
these modules like any linear layer: the wrapper calls the bitsandbytes module's own forward
and adds its deltas / scales around it, so no matmul is re-implemented here. Adapter
parameters are float32 (:func:`unit_placement`).

Weights are read for merging through one helper, :func:`dequantize_linear`. Merging in place
is refused (:data:`IN_PLACE_REFUSAL`): re-quantizing ``W + dW`` rounds it again, so unmerging
could not give back the original codes. ``merge_and_unload`` de-quantizes, folds in float32
and returns full-precision layers, or re-quantizes them with the layer's own settings.

bitsandbytes is optional (``pip install 'peftlab[quant]'``): this module imports it only inside
the functions that build quantized layers; :func:`is_quantized` looks it up in ``sys.modules``
(a model cannot hold its layers without it being imported).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

SCHEMES = ("nf4", "fp4", "int8")
# bits per weight incl. scales: 4-bit codes + one fp32 absmax per block of 64 (double quant: an
# 8-bit absmax per block plus an fp32 scale per 256 blocks); int8: the row scales are negligible
BLOCK_SIZE = 64
BITS_PER_PARAM = {
    ("nf4", False): 4 + 32 / BLOCK_SIZE,
    ("fp4", False): 4 + 32 / BLOCK_SIZE,
    ("nf4", True): 4 + 8 / BLOCK_SIZE + 32 / (BLOCK_SIZE * 256),
    ("fp4", True): 4 + 8 / BLOCK_SIZE + 32 / (BLOCK_SIZE * 256),
    ("int8", False): 8.0,
    ("int8", True): 8.0,
}
IN_PLACE_REFUSAL = (
    "its base layer is quantized ({scheme}): merging in place would re-quantize W + dW, and "
    "unmerging could not restore the original weights; use merge_and_unload() (de-quantizes and "
    "folds in float32; requantize=True quantizes the result again)"
)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"--quantize: unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    return scheme


def bnb_config(
    quantization: Any, *, compute_dtype: torch.dtype = torch.float32, double_quant: bool = False
) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``"nf4"`` / ``"fp4"`` / ``"int8"`` (4-bit:
    ``compute_dtype`` for the matmuls, ``double_quant`` for 8-bit block scales), or the given
    ``BitsAndBytesConfig`` itself. Validated without bitsandbytes installed."""
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        if not (quantization.load_in_4bit or quantization.load_in_8bit):
            raise ValueError(
                "quantization: the BitsAndBytesConfig sets neither load_in_4bit nor load_in_8bit"
            )
        return quantization
    if not isinstance(quantization, str):
        raise ValueError(
            f"quantization: expected {', '.join(SCHEMES)} or a BitsAndBytesConfig, got {quantization!r}"
        )
    scheme = check_scheme(quantization)
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=scheme,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def scheme_of(config: Any) -> str:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a ``BitsAndBytesConfig``."""
    return "int8" if config.load_in_8bit else str(config.bnb_4bit_quant_type)


class _Int8CastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" at every int8 matmul whose input is
    not fp16 (every call on the CPU): expected (README, "Adapters on a quantized base"), and once
    per layer per step it would bury every other line. Dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in str(record.msg)


# bitsandbytes' module logger (the same object whether bitsandbytes is imported before or after)
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Int8CastNotice())


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_quantized(m)]


def module_scheme(module: nn.Module) -> str:
    """The scheme of a quantized layer: ``"nf4"``, ``"fp4"`` or ``"int8"``."""
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        return str(module.weight.quant_type)
    return "int8"


def weight_count(param: torch.Tensor) -> int:
    """How many weights ``param`` holds: a bitsandbytes 4-bit weight packs ``8 / bits`` of them
    into each element of its storage dtype (two per uint8)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def unit_placement(base_layer: nn.Module, weight: torch.Tensor) -> dict[str, Any]:
    """Device and dtype for an adapter's parameters at ``base_layer`` (whose weight is
    ``weight``): the weight's, or float32 over a quantized layer (its codes are integers)."""
    dtype = torch.float32 if is_quantized(base_layer) else weight.dtype
    return {"device": weight.device, "dtype": dtype}


def one_cpu_kernel(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' 4-bit layers on their one CPU path (in place; returns ``model``).

    bitsandbytes 0.50 switches a ``Linear4bit`` on an AVX512-BF16 CPU, at its first no-grad eval
    forward, to a repacked weight layout with block scales rounded to bfloat16: that changes the
    outputs between training and inference, cannot be de-quantized for merging, and fails for
    layers with fewer than 64 inputs. Turned off, every forward de-quantizes the stored codes.
    """
    bnb = _bnb()
    if bnb is not None:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight a quantized layer computes with (a copy)."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(
            "this 4-bit layer's weight is in bitsandbytes' repacked CPU layout and cannot be "
            "de-quantized; load the base through peftlab (or call quantized.one_cpu_kernel(model) "
            "before the first forward)"
        )
    weight = dequantize_bnb_weight(
        module.weight,  # type: ignore[arg-type]
        getattr(module, "state", None),
    )
    return weight.detach().to(torch.float32).clone()


def dequantize_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` with a quantized layer's de-quantized weight and bias."""
    weight = dequantized_weight(module)
    bias = getattr(module, "bias", None)
    out = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    out.requires_grad_(False)
    return out


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in (its bias's, else float32)."""
    found = getattr(module, "compute_dtype", None)
    if isinstance(found, torch.dtype):
        return found
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) else torch.float32


def quantize_linear(linear: nn.Module, config: Any, device: torch.device | str | None = None) -> nn.Module:
    """``linear`` (an ``nn.Linear``, or GPT-2's ``Conv1D`` transposed) as a bitsandbytes layer
    quantized by ``config`` (a ``BitsAndBytesConfig``) on ``device`` (default: where it is)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    weight: torch.Tensor = linear.weight.detach()  # type: ignore[operator]
    if isinstance(linear, Conv1D):
        weight = weight.T
    out_features, in_features = weight.shape
    bias = getattr(linear, "bias", None)
    target = torch.device(device) if device is not None else weight.device
    q: nn.Module
    if config.load_in_8bit:
        q = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=config.llm_int8_threshold,
            device="meta",
        )
        q.weight = bnb.nn.Int8Params(weight.contiguous().cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            weight.contiguous().cpu(),
            requires_grad=False,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
        )
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    # bitsandbytes quantizes a CPU weight when it is moved to a device (the CPU included)
    return one_cpu_kernel(q.to(target))


def config_of(module: nn.Module) -> Any:
    """A ``BitsAndBytesConfig`` that quantizes a layer as ``module`` is quantized."""
    from transformers import BitsAndBytesConfig

    bnb = _bnb()
    assert bnb is not None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=module.state.threshold)
    weight: Any = module.weight
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=weight.quant_type,
        bnb_4bit_use_double_quant=bool(weight.compress_statistics),
        bnb_4bit_compute_dtype=compute_dtype_of(module),
        bnb_4bit_quant_storage=weight.quant_storage,
    )


def quantize_model(
    model: nn.Module, config: Any, *, skip: set[str] | frozenset[str] = frozenset()
) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` / ``Conv1D`` of ``model`` but the names in ``skip``
    and ``config.llm_int8_skip_modules`` (output heads should be among them) with its quantized
    bitsandbytes layer; for models transformers will not quantize while loading (GGUF files)."""
    from transformers.pytorch_utils import Conv1D

    skipped = set(skip) | set(config.llm_int8_skip_modules or ())
    chosen = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
        and not is_quantized(m)
        and not any(name == s or name.endswith(f".{s}") for s in skipped)
    ]
    if not chosen:
        raise ValueError(
            f"--quantize: {type(model).__name__} has no linear layers bitsandbytes can quantize "
            "(it quantizes nn.Linear and Conv1D); drop --quantize for this model"
        )
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(getattr(parent, child), config))
    model_config = getattr(model, "config", None)
    if model_config is not None:
        model_config.quantization_config = config
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every quantized layer of ``model`` replaced (in place) by a plain ``nn.Linear`` in ``dtype``
    holding the weights it computed with, and the quantization marks dropped: the full-precision
    model that computes what the quantized one did (up to the kernels' rounding)."""
    for name, module in quantized_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dequantize_linear(module, dtype))
    forget_quantization(model)
    return model


def forget_quantization(model: nn.Module) -> None:
    """Drop the quantization marks transformers puts on a model once no layer is quantized any more
    (so ``save_pretrained`` writes it as the full-precision model it now is)."""
    if quantized_modules(model):
        return
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    for attr in (
        "hf_quantizer",
        "is_loaded_in_4bit",
        "is_loaded_in_8bit",
        "is_quantized",
        "quantization_method",
    ):
        if attr in vars(model):
            delattr(model, attr)


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool = True) -> nn.Module:
    """What QLoRA training expects of a quantized base (as HF PEFT's
    ``prepare_model_for_kbit_training``): normalisation weights in float32, gradients flowing
    into the frozen embeddings' outputs (needed by gradient checkpointing when nothing before
    the first adapter trains), and optionally non-reentrant gradient checkpointing."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                for param in module.parameters(recurse=False):
                    if param.is_floating_point() and param.dtype != torch.float32:
                        param.data = param.data.to(torch.float32)
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs and under DDP), by the name
    the installed transformers has (``activation_checkpointing_enable`` since v5, before it
    ``gradient_checkpointing_enable``, now a deprecated alias that warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing off again where :func:`enable_activation_checkpointing` turned it
    on (a shared base goes back to the next method as it was loaded)."""
    on = getattr(model, "is_activation_checkpointing", None)
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    if not on:
        return
    disable = getattr(model, "activation_checkpointing_disable", None)
    if callable(disable):
        disable()
    else:
        model.gradient_checkpointing_disable()  # type: ignore[operator]
