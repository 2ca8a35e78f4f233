"""``peftlab train``: fine-tune one method on a data file or built-in task, with progress,
checkpoints, exact resume, and DDP under ``torchrun`` / ``accelerate launch``.

Settings come from built-in defaults, then ``--config run.yaml|run.json``, then the flags
given on the command line (flags win). Flags left out are not set at all (``SUPPRESS``), so a
run file's value is only replaced by a flag the user typed.
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from peftlab.data.catalog import task_names
from peftlab.devices import DEVICE_HELP, DTYPE_HELP
from peftlab.presets import PRESETS
from peftlab.training.loop import SCHEDULES
from peftlab.training.memory import MAX_MEMORY_HELP
from peftlab.training.run import run_training
from peftlab.training.settings import (
    METHOD_OPTION_KEYS,
    RunConfig,
    merge_settings,
    normalize_settings,
    read_run_file,
)
from peftlab.training.tracking import REPORT_TO

_REGEX_CHARS = set("*+?[](){}|^$\\")


def _max_grad_norm(value: str) -> float | None:
    if value.lower() in ("none", "off"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number (or 'none' for no clipping)") from None


def _number(value: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None


def parse_target_modules(value: str) -> list[str] | str:
    """``q_proj,v_proj`` -> a list; ``all-linear`` or a regex (``.*proj``) -> the string."""
    if "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    if value == "all-linear" or _REGEX_CHARS & set(value):
        return value
    return [value]


def parse_method_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that parses as JSON (numbers, true, null, lists) is that value."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--method-option {item!r}: expected KEY=VALUE, e.g. use_rslora=true")
        if key in out:
            raise ValueError(f"--method-option: {key!r} is given twice")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def register(sub: Any) -> None:
    S = argparse.SUPPRESS
    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="fine-tune one method on a JSONL/CSV file or a built-in task, with checkpoints and resume",
        description=(
            "Fine-tune a causal LM with one method and save the adapter in PEFT's format (full "
            "fine-tuning: the model as safetensors). Settings: defaults < --config file < flags. "
            "Run under `torchrun --nproc_per_node=N -m peftlab train ...` for data parallelism."
        ),
        argument_default=S,
    )
    p.add_argument("--config", metavar="FILE", help="run file (.json, .yaml) holding any of these settings")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help="HF id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    g.add_argument("--gguf-file", help="GGUF file name inside --model")
    g.add_argument("--method", choices=list(PRESETS), help="default: lora (settings: peftlab.presets)")
    g.add_argument(
        "--method-option",
        action="append",
        metavar="KEY=VALUE",
        help="any field of the method's config (repeatable), e.g. use_rslora=true, init_weights=zeros",
    )
    g.add_argument("--r", type=int, help="LoRA rank")
    g.add_argument("--lora-alpha", type=_number, help="LoRA scaling numerator")
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout probability")
    g.add_argument(
        "--target-modules",
        type=parse_target_modules,
        help="LoRA/IA3 targets: q_proj,v_proj | all-linear | a regex (default: the architecture's)",
    )
    g.add_argument("--reduction-factor", type=_number, help="bottleneck: hidden size / bottleneck width")
    g.add_argument("--bottleneck-size", type=int, help="bottleneck width (instead of --reduction-factor)")
    g.add_argument("--non-linearity", help="bottleneck activation (relu, gelu, swish, tanh, ...)")
    g.add_argument("--num-virtual-tokens", type=int, help="prefix length")
    g.add_argument("--prefix-projection", action=argparse.BooleanOptionalAction, help="prefix through an MLP")
    d = p.add_argument_group("data and evaluation")
    d.add_argument(
        "--data", metavar="FILE", help="JSONL/CSV: prompt/completion, text/label or chat (messages) rows"
    )
    d.add_argument(
        "--chat-template",
        metavar="auto|none|FILE",
        help="auto: the tokenizer's chat template when it has one (chat rows need one; prompt/"
        "completion rows become a user and an assistant turn); none: plain prompt + completion; "
        "or a Jinja template file (default auto)",
    )
    d.add_argument(
        "--task", metavar="NAME", help=f"built-in task instead of --data: {', '.join(task_names())}"
    )
    d.add_argument("--eval-data", metavar="FILE", help="held-out file (default: a split of --data)")
    d.add_argument("--eval-fraction", type=float, help="fraction of --data held out (default 0.1)")
    d.add_argument("--eval-every", type=int, help="evaluate every N steps (default: only at the end)")
    d.add_argument("--num-eval", type=int, help="held-out examples evaluated (default 100; 0: none)")
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    t.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    t.add_argument("--batch-size", type=int, help="examples per forward pass and process (default 8)")
    t.add_argument("--grad-accum", type=int, help="forward passes per optimizer step (default 1)")
    t.add_argument(
        "--lr",
        type=float,
        help="learning rate (default: "
        + ", ".join(f"{m} {p.learning_rate:g}" for m, p in PRESETS.items())
        + ")",
    )
    t.add_argument("--lr-schedule", choices=SCHEDULES, help="after the warmup (default: linear)")
    t.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    t.add_argument(
        "--max-grad-norm", type=_max_grad_norm, help="gradient clipping norm or 'none' (default 1)"
    )
    t.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute activations in the backward pass to save memory",
    )
    t.add_argument(
        "--auto-batch",
        action=argparse.BooleanOptionalAction,
        help="fit memory: split each batch into micro-batches with gradient accumulation (the same "
        "examples per step), then activation checkpointing, from the memory estimate; on an "
        "out-of-memory error halve the micro-batch and go on from the last checkpoint",
    )
    t.add_argument(
        "--max-memory", type=float, metavar="GIB", help=MAX_MEMORY_HELP + " (implies --auto-batch)"
    )
    t.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="load the frozen base quantized by bitsandbytes: nf4, fp4 or int8 (QLoRA: nf4); "
        "adapters train in fp32 (needs pip install 'peftlab[quant]')",
    )
    t.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        help="with --quantize nf4/fp4: store the block scales in 8 bits too (~0.37 bits/param less)",
    )
    t.add_argument("--seed", type=int, help="seed of adapter init, data split and order, dropout (default 0)")
    t.add_argument("--max-length", type=int, help="maximum tokens per example (default: from the data)")
    t.add_argument("--device", metavar="DEVICE", help=f"{DEVICE_HELP} (default auto)")
    t.add_argument(
        "--dtype",
        metavar="DTYPE",
        help=f"{DTYPE_HELP}; bf16/fp16 = mixed precision: frozen weights in it, what trains in fp32 "
        "(default float32)",
    )
    o = p.add_argument_group("output and checkpoints")
    o.add_argument("--out", metavar="DIR", help="output folder (default: ./peftlab-train)")
    o.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100; 0: none)")
    o.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept (default 2)")
    o.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    o.add_argument(
        "--report-to",
        choices=REPORT_TO,
        help="log loss, learning rate, tokens/s, evaluations and the settings to a tracker "
        "(default none; needs pip install 'peftlab[NAME]')",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="library warnings and full tracebacks")
    p.set_defaults(func=run)


_NOT_SETTINGS = {"config", "resume", "verbose", "func", "command", "argv", "method_option"}


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user typed, in run-file form (method option flags in method_options)."""
    given = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    options = parse_method_options(getattr(args, "method_option", None) or [])
    for key in METHOD_OPTION_KEYS:
        if key in given:
            if key in options:
                raise ValueError(
                    f"method option {key!r} is given twice (--{key.replace('_', '-')} and --method-option)"
                )
            options[key] = given.pop(key)
    settings = normalize_settings(given, "command line")
    if options:
        settings["method_options"] = options
    return settings


def run(args: argparse.Namespace) -> int:
    from_file = read_run_file(args.config) if getattr(args, "config", None) else {}
    merged = merge_settings(from_file, settings_from_args(args))
    source = f"{args.config} + command line" if getattr(args, "config", None) else "command line"
    config = RunConfig.from_dict(merged, source=source)
    run_training(
        config,
        resume=bool(getattr(args, "resume", False)),
        verbose=bool(getattr(args, "verbose", False)),
        command="peftlab " + shlex.join(getattr(args, "argv", [])),
    )
    return 0
