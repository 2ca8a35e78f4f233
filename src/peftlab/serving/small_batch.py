"""Linear layers of a decoding step with few rows, computed as ``weight @ x^T`` on the CPU.

A decoding step multiplies every weight matrix by one token per running row: a few on a
light-loaded server. For such products the x86 MKL build of torch takes a slow path in
``F.linear`` (``x @ weight^T``): on SmolLM2-135M a decoding step of 2-4 rows costs 1.5-2.0x one
row's, and even one row reads the weights at about half the memory bandwidth that
``torch.mm(weight, x^T)`` reaches; with this module steps of 1-4 rows take 0.64-0.85x the time
(``benchmarks/RESULTS.md``, ``mixed_batch.py --parts small-rows``). :class:`SmallBatchLinear`,
a ``TorchFunctionMode`` in force for the span of one model call, computes each fp32 CPU
``F.linear`` with at most :data:`MAX_ROWS` rows as
``(weight @ x^T)^T`` (one row doubled: the two-row product is the fast one), every other call
unchanged. The model and its modules are not touched; the results equal ``F.linear``'s within
float summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 4  # from 6-8 rows on F.linear is as fast or faster (measured on SmolLM2's shapes)
CHOICES = ("auto", "on", "off")
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not quantized or other tensor subclasses


def _small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` as ``(weight @ x^T)^T`` where that applies, else None."""
    if (
        x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or weight.dim() != 2
        or x.dim() == 0
        or x.shape[-1] != weight.shape[1]
        or x.is_sparse
        or weight.is_sparse
        or type(x) not in _PLAIN
        or type(weight) not in _PLAIN
    ):
        return None
    rows = x.numel() // max(1, x.shape[-1])
    if not 1 <= rows <= MAX_ROWS:
        return None
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.repeat(2, 1)
    out = torch.mm(weight, flat.t())[:, :rows].t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SmallBatchLinear(TorchFunctionMode):
    """Within the block, ``F.linear`` with few fp32 CPU rows runs as ``weight @ x^T``."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
                out = _small_linear(x, weight, bias)
                if out is not None:
                    return out
        return func(*args, **kwargs)


def check_choice(choice: str) -> None:
    """A ValueError naming the choices unless ``choice`` is one of them."""
    if choice not in CHOICES:
        raise ValueError(f"small_batch_matmul must be one of {', '.join(CHOICES)}, got {choice!r}")


def wanted(choice: str, device: torch.device) -> bool:
    """Whether ``choice`` (``auto``: on the CPU of a torch built with MKL; ``on``; ``off``) turns
    :class:`SmallBatchLinear` on for a model on ``device``."""
    check_choice(choice)
    if choice == "auto":
        return device.type == "cpu" and torch.backends.mkl.is_available()
    return choice == "on"


@contextlib.contextmanager
def small_batch_linear(enabled: bool) -> Iterator[None]:
    """:class:`SmallBatchLinear` in force for the block when ``enabled``, else nothing."""
    if not enabled:
        yield
        return
    with SmallBatchLinear():
        yield
