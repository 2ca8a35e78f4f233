"""Devices and precisions, parsed and checked in one place for every command.

``--device auto|cpu|cuda|cuda:N|mps``: ``auto`` is the first GPU when there is one (CUDA, then
Apple's MPS), else the CPU. ``--dtype auto|float32|bfloat16|float16``: ``auto`` is bfloat16
where the device runs it natively (a CUDA GPU with bf16 support, a CPU whose oneDNN has native
bf16 instructions, e.g. AVX512-BF16 or AMX) and float32 elsewhere.

Mixed precision (:class:`Precision`), the way PEFT users expect it: the *frozen* weights are held
in the low-precision dtype, everything that trains (adapter parameters, classification heads,
or every weight in full fine-tuning) is held in float32 together with its AdamW state, and the
forward pass runs under :func:`torch.autocast` in the low-precision dtype, so matrix products
run in bf16/fp16 while the loss, the gradients of what trains and the optimizer update stay in
fp32. Full fine-tuning is therefore autocast over fp32 (master) weights. float16 adds a
:class:`torch.amp.GradScaler` against gradient underflow; bfloat16 needs none.

Errors are one line naming the fix, raised before any weights are loaded.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_HELP = "auto (first GPU, else CPU) | cpu | cuda | cuda:N | mps"
DTYPE_HELP = "auto (bfloat16 where the device runs it natively, else float32) | float32 | bfloat16 | float16"
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")


def parse_device(value: str) -> str:
    """The normalised ``--device`` value (syntax only; :func:`resolve_device` checks availability)."""
    choice = str(value).strip().lower()
    if choice in ("auto", "cpu", "cuda", "mps") or _CUDA_INDEX.match(choice):
        return choice
    raise ValueError(f"--device {value!r}: expected one of {', '.join(DEVICE_CHOICES)}")


def parse_dtype(value: str) -> str:
    """The normalised ``--dtype`` value; a few common spellings (bf16, fp16, fp32) are accepted."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    choice = str(value).strip().lower()
    choice = aliases.get(choice, choice)
    if choice in DTYPE_CHOICES:
        return choice
    raise ValueError(f"--dtype {value!r}: expected one of {', '.join(DTYPE_CHOICES)}")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(value: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """The device ``--device value`` means on this machine. Under ``torchrun`` (``local_rank``
    given) ``cuda`` / ``auto`` take the process's own GPU, ``cuda:LOCAL_RANK``."""
    choice = parse_device(value)
    if choice == "auto":
        if torch.cuda.is_available():
            choice = "cuda"
        elif mps_available() and local_rank is None:
            choice = "mps"
        else:
            return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not mps_available():
            raise ValueError("--device mps: torch sees no Apple GPU (MPS) here; use --device cpu (or auto)")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {choice}: torch sees no CUDA GPU here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu (or auto)"
        )
    count = torch.cuda.device_count()
    match = _CUDA_INDEX.match(choice)
    if match is not None:
        if local_rank is not None:
            raise ValueError(
                f"--device {choice}: under torchrun each process takes its own GPU (cuda:LOCAL_RANK); "
                "pass --device cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        index = int(match.group(1))
        if index >= count:
            raise ValueError(
                f"--device {choice}: only {count} CUDA device{'s' if count != 1 else ''} visible "
                f"(cuda:0..cuda:{count - 1}); pick one of them"
            )
        return torch.device("cuda", index)
    index = local_rank or 0
    if index >= count:
        raise ValueError(
            f"LOCAL_RANK={index} but only {count} CUDA devices are visible; start at most one process per GPU"
        )
    return torch.device("cuda", index)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 arithmetic natively (not emulated through fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        # oneDNN's own check: AVX512-BF16 / AMX (Intel Cooper Lake+, AMD Zen 4+) or Arm BF16
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _cuda_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def resolve_dtype(value: str, device: torch.device) -> torch.dtype:
    """The dtype ``--dtype value`` means on ``device``; one the device cannot run is an error."""
    choice = parse_dtype(value)
    if choice == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtype = DTYPES[choice]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"--dtype bfloat16: {_cuda_name(device)} has no bfloat16 support; use --dtype float16 "
            "(trained with loss scaling) or float32"
        )
    if dtype == torch.bfloat16 and device.type == "mps":
        macos14 = getattr(torch.backends.mps, "is_macos_or_newer", lambda *_: False)(14, 0)
        if not macos14:
            raise ValueError("--dtype bfloat16: MPS runs bfloat16 from macOS 14 on; use --dtype float16")
    return dtype


@dataclass(frozen=True)
class Precision:
    """Where a model runs and in which dtype its frozen weights and its autocast region are
    (see the module docstring). ``Precision()`` is the CPU in float32: nothing changes."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(
        cls, device: str = "auto", dtype: str = "float32", *, local_rank: int | None = None
    ) -> Precision:
        """Parse and check ``--device`` and ``--dtype`` (before anything is loaded)."""
        resolved = resolve_device(device, local_rank=local_rank)
        return cls(resolved, resolve_dtype(dtype, resolved))

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def mixed(self) -> bool:
        """Whether the forward runs in a lower precision than the fp32 it trains in."""
        return self.dtype != torch.float32

    def load_dtype(self, *, trains_everything: bool = False) -> torch.dtype:
        """The dtype to load a base model in: fp32 when every weight trains (full fine-tuning
        keeps fp32 master weights), else the frozen weights' dtype."""
        return torch.float32 if trains_everything else self.dtype

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's autocast region (a no-op in float32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for float16 (its gradients underflow without one); None otherwise."""
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device, its frozen floating-point weights to :attr:`dtype` and its
        trainable ones to float32 (in place; returns ``model``). Buffers keep their dtype
        (rotary frequency tables stay as the model made them)."""
        model.to(self.device)
        with torch.no_grad():
            for param in unique_parameters(model):
                if not param.is_floating_point():
                    continue
                want = torch.float32 if param.requires_grad else self.dtype
                if param.dtype != want:
                    param.data = param.data.to(want)
        return model

    def describe(self) -> str:
        if not self.mixed:
            return f"{self.device}, float32"
        scaler = ", loss scaling" if self.dtype == torch.float16 else ""
        return (
            f"{self.device}, {self.dtype_name} mixed precision (frozen weights {self.dtype_name}, "
            f"trained parameters and AdamW state float32, autocast{scaler})"
        )

    def to_dict(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": self.dtype_name}


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` runs: the device of its first parameter."""
    return next(model.parameters()).device


def unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter once (tied weights are one parameter)."""
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            yield param


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int | None]]:
    """``{"peak_bytes": ...}`` filled in on exit: ``torch.cuda.max_memory_allocated`` over the
    block on a CUDA device, None elsewhere (measure the process's peak RSS there)."""
    result: dict[str, int | None] = {"peak_bytes": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
