"""``peftlab recommend``: which PEFT method to use, with its settings and the reasons.

With ``--results`` from ``peftlab compare --sizes`` and ``--examples N``, the measured curve at the
size nearest N decides instead of the lesson's rule; the output says which decided.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from peftlab.recommend import MODEL_TYPES, Constraints, load_results, model_type_of, recommend


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "recommend",
        help="the method decision for your constraints, with its reasons",
        description="Apply the lesson's decision procedure (or measured results) to your constraints.",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=None,
        help="number of training examples (with curves in --results: the measured size nearest it decides)",
    )
    p.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default=None,
        help="kind of base model (default: that of --model or of the --results' model, else causal)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a model folder or hub id: its config says its kind (encoder-decoder: seq2seq); no weights load",
    )
    p.add_argument("--memory-gb", type=float, default=None, help="training memory budget in GB")
    p.add_argument(
        "--lora-memory-gb",
        type=float,
        default=None,
        help="LoRA's training memory on your model (see `peftlab count`), to test the budget against",
    )
    p.add_argument("--tasks", type=int, default=1, help="number of tasks to serve from one base model")
    p.add_argument("--zero-overhead", action="store_true", help="inference must cost nothing extra")
    p.add_argument(
        "--results",
        default=None,
        help="results.json from `peftlab compare` (measured; with --sizes it holds quality curves)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.examples is not None and args.examples < 1:
        raise ValueError(f"--examples must be a positive number of training examples, got {args.examples}")
    results = load_results(args.results) if args.results else None
    constraints = Constraints(
        num_examples=args.examples,
        model_type=model_type_of(args.model_type, args.model, results),
        memory_budget_gb=args.memory_gb,
        lora_memory_gb=args.lora_memory_gb,
        num_tasks=args.tasks,
        zero_overhead=args.zero_overhead,
    )
    rec = recommend(constraints, results)
    if args.memory_gb is not None and args.lora_memory_gb is None and results is None:
        rec.reasons.append(
            "the memory budget was not tested: pass --lora-memory-gb (from `peftlab count`) or --results"
        )
    print(json.dumps(rec.to_dict(), indent=2) if args.json else rec.render())
    return 0
