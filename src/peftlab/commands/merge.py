"""``peftlab merge``: fold a LoRA or IA3 adapter into its base model and save a plain model.

The result is an ordinary transformers folder (safetensors weights, config, tokenizer) that
``AutoModel*.from_pretrained`` loads without peftlab and that runs at the base model's speed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.checkpoint import read_adapter_config
from peftlab.config import TaskType
from peftlab.methods import method_for
from peftlab.models import DEFAULT_CAUSAL_LM, quiet, resolve_model_path
from peftlab.peft_model import PeftModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the transformers Auto class that builds the model an adapter's task type was trained on
AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "merge",
        help="fold a LoRA/IA3 adapter into its base model and save a plain transformers model",
        description=(
            "Load BASE, apply the adapter saved in ADAPTER, merge it into the weights and write "
            "OUT with transformers' save_pretrained (safetensors) plus the tokenizer. OUT loads "
            "with AutoModel*.from_pretrained, no peftlab needed. LoRA and IA3 only: bottleneck "
            "adapters and prefix tuning are not weight updates and cannot be merged."
        ),
    )
    p.add_argument("base", metavar="BASE", help=f"base model folder, .gguf file, or {DEFAULT_CAUSAL_LM!r}")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (adapter_config.json + weights)")
    p.add_argument("out", metavar="OUT", help="folder to write the merged model to (new or empty)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside the BASE folder to load")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the written weights; merging itself is done in float32 (default: float32)",
    )
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT")
    p.add_argument("--verbose", action="store_true", help="show transformers' logs and full tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out, adapter = Path(args.out), Path(args.adapter)
    _check_out(out, [adapter, Path(args.base)], force=args.force)
    config = read_adapter_config(adapter)
    method = method_for(config)
    if not method.mergeable:
        raise ValueError(
            f"{adapter} holds a {config.peft_type} adapter, which cannot be merged: "
            f"{method.unmergeable_reason or 'it is not a weight update'}; load it with "
            "PeftModel.from_pretrained instead"
        )
    task_type = getattr(config, "task_type", None)
    auto_name = AUTO_CLASSES[task_type]
    model, tokenizer = _load_base(args.base, args.gguf_file, auto_name, args.verbose)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged = _savable(merged, auto_name).to(DTYPES[args.dtype])
    _write(out, merged, tokenizer, args.verbose)
    n_params = sum(p.numel() for p in merged.parameters())
    print(
        f"merged the {config.peft_type} adapter {adapter} into {args.base}: wrote {out} "
        f"({n_params:,} parameters, {args.dtype}{', with tokenizer' if tokenizer is not None else ''})"
    )
    return 0


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_out(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an OUT that would overwrite work: non-empty without --force, or holding an input."""
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


def _load_base(base: str, gguf_file: str | None, auto_name: str, verbose: bool) -> tuple[nn.Module, Any]:
    import transformers

    auto_cls = getattr(transformers, auto_name)
    with quiet(verbose):
        try:
            path, gguf = resolve_model_path(base, gguf_file)
            extra = {"gguf_file": gguf} if gguf else {}
            model = auto_cls.from_pretrained(path, dtype=torch.float32, **extra)
        except OSError as err:
            raise ValueError(
                f"cannot load the base model {base!r} as {auto_name}: {err}. Pass a local model "
                f"folder, a .gguf file (or a folder with --gguf-file), or {DEFAULT_CAUSAL_LM!r}"
            ) from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **extra)
        except (OSError, ValueError, TypeError):
            print(f"note: {base} has no tokenizer that loads; the merged folder will have none")
            tokenizer = None
    model.eval()
    return model, tokenizer


def _savable(model: nn.Module, auto_name: str) -> nn.Module:
    """A model transformers will save: one loaded from GGUF is flagged as quantized (and
    refused) although its weights are already plain floats, so copy them into a fresh one."""
    import transformers

    config: Any = getattr(model, "config", None)
    if getattr(model, "hf_quantizer", None) is None and not hasattr(config, "quantization_config"):
        return model
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain: nn.Module = getattr(transformers, auto_name).from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def _write(out: Path, model: nn.Module, tokenizer: Any, verbose: bool) -> None:
    """Write into a temporary sibling folder, then swap it in, so OUT is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = out.parent / f".{out.name}.tmp-{token}"
    tmp.mkdir()
    try:
        with quiet(verbose):
            model.save_pretrained(tmp)  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        old = out.parent / f".{out.name}.old-{token}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
