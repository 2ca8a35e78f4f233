"""``peftlab demo``: LoRA and IA3 on SmolLM2-135M, trained briefly on the built-in JSON task.

One base model carries both adapters; ``train_adapter`` switches which one is active and
trainable, so each is trained and evaluated on its own against the same frozen base. The
base model is scored first with ``disable_adapter``. A few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from peftlab import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab.models import DEFAULT_CAUSAL_LM, load_causal_lm, quiet
from peftlab.tasks import get_task
from peftlab.training import EvalResult, TrainConfig, encode_examples, evaluate_task, pad_id, train

TASK = "structured"
SHOWN = 3  # generations shown before/after


@dataclass(frozen=True)
class _Run:
    name: str  # adapter name, also the label printed
    config: PeftConfig
    learning_rate: float  # IA3 scales by vectors near 1 and wants a much larger step than LoRA


RUNS = (
    _Run("LoRA", LoraConfig(r=8, lora_alpha=16), 2e-3),
    _Run("IA3", IA3Config(), 2e-2),
)


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
    p.add_argument("-v", "--verbose", action="store_true", help="show transformers' warnings and progress")
    p.set_defaults(func=run)


def _one_line(text: str, width: int = 96) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _metrics(result: EvalResult) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())


def _targets(model: PeftModel, adapter: str) -> str:
    # adapter modules live at "<module path>.adapters.<name>"; show the module names once each
    names = {path.split(".adapters.")[0].rsplit(".", 1)[-1] for path, _ in model.adapter_modules(adapter)}
    return ", ".join(sorted(names))


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch_size < 1 or args.num_eval < 1:
        raise ValueError("--steps, --batch-size and --num-eval must be at least 1")
    task = get_task(TASK, seed=args.seed, num_eval=args.num_eval)
    label = args.model or DEFAULT_CAUSAL_LM
    print(f"peftlab demo: LoRA and IA3 on {label}, task '{task.name}' ({task.description})")

    start = time.perf_counter()
    base, tokenizer = load_causal_lm(args.model, verbose=args.verbose)
    total = sum(p.numel() for p in base.parameters())
    print(
        f"loaded {label}: {total:,d} parameters in {time.perf_counter() - start:.1f} s; "
        f"{len(task.train)} training and {len(task.eval)} eval examples\n"
    )
    data = encode_examples(tokenizer, task.train)

    # adapter initialisation (LoRA's A) draws from torch's global RNG
    torch.manual_seed(args.seed)
    model = get_peft_model(base, RUNS[0].config, adapter_name=RUNS[0].name)
    for extra in RUNS[1:]:
        model.add_adapter(extra.name, extra.config)

    results: dict[str, EvalResult] = {}
    times: dict[str, float] = {}
    params: dict[str, int] = {}
    with quiet(args.verbose):
        print("== base model (adapters disabled) ==")
        with model.disable_adapter():
            results["base"] = evaluate_task(model, tokenizer, task)
        print(f"eval: {_metrics(results['base'])}  ({results['base'].seconds:.1f} s)\n")

        for spec in RUNS:
            model.train_adapter(spec.name)
            params[spec.name] = model.get_nb_trainable_parameters()[0]
            print(f"== {spec.name} on {_targets(model, spec.name)} ==")
            model.print_trainable_parameters()
            config = TrainConfig(
                steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=spec.learning_rate,
                warmup_steps=min(3, args.steps - 1),
                seed=args.seed,
            )
            history = train(model, data, config, pad_token_id=pad_id(tokenizer), desc=f"train {spec.name}")
            times[spec.name] = history.total_time
            print(
                f"loss {history.losses[0]:.3f} -> {history.losses[-1]:.3f} in {history.total_time:.1f} s "
                f"({history.tokens_per_second:.0f} tokens/s)"
            )
            model.eval()
            results[spec.name] = evaluate_task(model, tokenizer, task)
            print(f"eval: {_metrics(results[spec.name])}  ({results[spec.name].seconds:.1f} s)\n")

    print("== generations (whitespace collapsed) ==")
    for i in range(min(SHOWN, len(task.eval))):
        # the prompt's last lines are "Text: ..." and the answer cue "JSON:"
        print(f"input:    {_one_line(task.eval[i].prompt.splitlines()[-2])}")
        print(f"expected: {_one_line(task.eval[i].completion)}")
        for name, result in results.items():
            print(f"{name + ':':9s} {_one_line(result.predictions[i])}")
        print()

    metric = task.metric
    print(f"== summary: {metric} on {len(task.eval)} eval examples ==")
    print(f"{'method':8s} {'trainable params':>16s} {'train time':>10s}  {metric} before -> after")
    before = results["base"].metrics[metric]
    for spec in RUNS:
        after = results[spec.name].metrics[metric]
        print(
            f"{spec.name:8s} {params[spec.name]:>16,d} {times[spec.name]:>9.1f}s  {before:.3f} -> {after:.3f}"
        )
    return 0
