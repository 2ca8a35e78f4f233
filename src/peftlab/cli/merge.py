"""``peftlab merge``: fold a LoRA or IA3 adapter into its base model and save a plain model
(see :mod:`peftlab.merge`)."""

from __future__ import annotations

import argparse
from typing import Any

from peftlab.devices import DTYPES
from peftlab.merge import merge_to_folder
from peftlab.models import DEFAULT_CAUSAL_LM


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
    p.add_argument(
        "--device", default="cpu", help="where to fold the adapter in: cpu (default), cuda, cuda:N, mps, auto"
    )
    p.add_argument(
        "--quantize",
        default=None,
        metavar="SCHEME",
        help="the adapter was trained over a base quantized to nf4, fp4 or int8 (QLoRA): load BASE "
        "so and fold into the de-quantized weights it trained against; OUT is full precision",
    )
    p.add_argument("--double-quant", action="store_true", help="with --quantize nf4/fp4: as trained")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT")
    p.add_argument("--verbose", action="store_true", help="show transformers' logs and full tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = merge_to_folder(
        args.base,
        args.adapter,
        args.out,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=args.device,
        force=args.force,
        verbose=args.verbose,
        quantize=args.quantize,
        double_quant=args.double_quant,
    )
    print(
        f"merged the {result.peft_type} adapter {args.adapter} into {args.base}: wrote {args.out} "
        f"({result.num_parameters:,} parameters, {args.dtype}"
        f"{f', folded into the de-quantized {args.quantize} base' if args.quantize else ''}"
        f"{', with tokenizer' if result.with_tokenizer else ''})"
    )
    return 0
