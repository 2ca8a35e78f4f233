"""``peftlab demo``: LoRA and IA3 on SmolLM2-135M, trained briefly on the built-in JSON task
(see :mod:`peftlab.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from peftlab.demo import TASK, run_demo
from peftlab.devices import DEVICE_HELP, DTYPE_HELP
from peftlab.models import DEFAULT_CAUSAL_LM


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train LoRA and IA3 briefly on a built-in task and show generations before/after",
        description=(
            "Attach LoRA (r=8 on the query and value projections) and IA3 to SmolLM2-135M, print "
            "their trainable parameters, train each a few dozen steps on the built-in "
            f"'{TASK}' task (sentence -> JSON) and show generations and scores before and after."
        ),
    )
    p.add_argument("--steps", type=int, default=24, help="training steps per adapter (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, adapter init and batches (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default: 8)")
    p.add_argument(
        "--num-eval", type=int, default=24, help="eval examples scored before and after (default: 24)"
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"causal LM folder, .gguf file or hub id (default: embedded {DEFAULT_CAUSAL_LM})",
    )
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--dtype", default="float32", help=f"{DTYPE_HELP} (default float32)")
    p.add_argument("-v", "--verbose", action="store_true", help="show transformers' warnings and progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_demo(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        num_eval=args.num_eval,
        model_name=args.model,
        device=args.device,
        dtype=args.dtype,
        verbose=args.verbose,
    )
    return 0
