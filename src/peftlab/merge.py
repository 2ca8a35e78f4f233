"""Merging an adapter into its base model for good: a plain transformers model that
``AutoModel*.from_pretrained`` loads without peftlab and that runs at the base model's speed.

LoRA and IA3 only: bottleneck adapters and prefix tuning are not weight updates. The merge is
done in float32 and the result is cast once to the requested dtype; the output folder is
written atomically (a crash leaves the previous contents, or nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core import atomic
from peftlab.core.checkpoint import read_adapter_config
from peftlab.core.peft_model import PeftModel
from peftlab.core.quantized import dequantize_model
from peftlab.core.registry import method_for
from peftlab.devices import DTYPES, parse_dtype, resolve_device
from peftlab.models import AUTO_CLASSES, load_base_model, quiet, savable


@dataclass(frozen=True)
class MergeResult:
    peft_type: str
    num_parameters: int
    with_tokenizer: bool


def merge_to_folder(
    base: str,
    adapter: str | Path,
    out: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    force: bool = False,
    verbose: bool = False,
    quantize: str | None = None,
    double_quant: bool = False,
) -> MergeResult:
    """Load ``base`` in float32 on ``device``, apply the adapter saved in ``adapter``, fold it
    into the weights in float32, cast the result once to ``dtype`` and write ``out``
    (transformers' ``save_pretrained`` plus the tokenizer, when the base has one).

    ``quantize`` (nf4 / fp4 / int8, with ``double_quant``): for an adapter trained over a base
    quantized so (QLoRA), the base is loaded quantized the same way and the adapter folded into
    the de-quantized weights it was trained against; every other quantized layer is
    de-quantized too, so the written model is full precision and computes what the adapted
    quantized model did. (Quantizing the merged weights again would round most of a small
    adapter's update away: see ``merge_and_unload(requantize=True)``.)"""
    out, adapter = Path(out), Path(adapter)
    if double_quant and quantize is None:  # (a bad scheme: load_base_model refuses it before loading)
        raise ValueError("--double-quant goes with --quantize nf4 or fp4; add --quantize or drop it")
    dtype = parse_dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: the merged weights need one of {', '.join(DTYPES)}")
    where = resolve_device(device)
    check_out(out, [adapter, Path(base)], force=force)
    config = read_adapter_config(adapter)
    method = method_for(config)
    if not method.mergeable:
        raise ValueError(
            f"{adapter} holds a {config.peft_type} adapter, which cannot be merged: "
            f"{method.unmergeable_reason or 'it is not a weight update'}; load it with "
            "PeftModel.from_pretrained instead"
        )
    task_type = getattr(config, "task_type", None)
    # float32 whatever the checkpoint holds: the fold W + s*B*A is done at full precision
    model, tokenizer = load_base_model(
        base,
        task_type=task_type,
        gguf_file=gguf_file,
        dtype=torch.float32,
        device=where,
        verbose=verbose,
        tokenizer=False,
        quantization=quantize,
        double_quant=double_quant,
    )
    if tokenizer is None:
        print(f"note: {base} has no tokenizer that loads; the merged folder will have none")
    # the adapter's units take the base's dtype, float32, whatever dtype its file holds
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if quantize is not None:
        merged = dequantize_model(merged)
    merged = savable(merged, AUTO_CLASSES[task_type]).to(device="cpu", dtype=DTYPES[dtype])
    _write(out, merged, tokenizer, verbose)
    return MergeResult(config.peft_type, sum(p.numel() for p in merged.parameters()), tokenizer is not None)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an OUT that would overwrite work: non-empty without ``force``, or holding an input."""
    target = out.resolve()
    for path in inputs:
        if path.exists() and (_within(path.resolve(), target) or _within(target, path.resolve())):
            raise ValueError(f"OUT {out} overlaps the input {path}; write the merged model to another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(
            f"OUT {out} is not empty; pass --force to replace its contents, or choose another folder"
        )


def _write(out: Path, model: nn.Module, tokenizer: Any, verbose: bool) -> None:
    with atomic.folder(out, replace=True) as tmp, quiet(verbose):
        model.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
