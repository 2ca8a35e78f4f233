"""``peftlab count``: exact trainable/total parameters and training-memory estimates per method
for a model config, built on the meta device with no weights loaded."""

from __future__ import annotations

import argparse
import json
from typing import Any

from peftlab.core.config import TaskType
from peftlab.count import count_methods, load_config_file, load_preset, preset_names


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "count",
        help="exact trainable/total parameters and memory estimates per method, no weights loaded",
        description=(
            "Build the model from its config.json on the meta device (no weights, seconds even for "
            "70B), apply each method through get_peft_model and print exact parameter counts and "
            "training-memory estimates for fp32 and bf16."
        ),
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="CONFIG.json", help="a transformers config.json (or its folder)")
    source.add_argument("--preset", metavar="NAME", help=f"a built-in config: {', '.join(preset_names())}")
    p.add_argument(
        "--task",
        choices=[t.value for t in TaskType],
        default=None,
        help="model head to build (default: the config's architectures entry)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="batch size for the activation estimate (1)")
    p.add_argument(
        "--seq-len", type=int, default=512, help="sequence length for the activation estimate (512)"
    )
    p.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="also estimate adapters over a base quantized to nf4, fp4 or int8 (NF4: 4.5 bits/param "
        "incl. scales)",
    )
    p.add_argument("--double-quant", action="store_true", help="with --quantize nf4/fp4: 8-bit block scales")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.preset is not None:
        data, label = load_preset(args.preset), args.preset
    elif args.config is not None:
        data, label = load_config_file(args.config), str(args.config)
    else:
        raise ValueError(
            f"give --config path/to/config.json or --preset NAME (presets: {', '.join(preset_names())})"
        )
    report = count_methods(
        data,
        label=label,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        task=TaskType(args.task) if args.task else None,
        quantize=args.quantize,
        double_quant=args.double_quant,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0
