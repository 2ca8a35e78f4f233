"""The demo tour (``peftlab demo``): LoRA and IA3 on SmolLM2-135M, trained briefly on the built-in JSON task.

One base model carries both adapters; ``train_adapter`` switches which one is active and
trainable, so each is trained and evaluated on its own against the same frozen base. The
base model is scored first with ``disable_adapter``. A few minutes on two CPU cores.
"""

from __future__ import annotations

import re
import time

import torch

from peftlab.core.config import PeftConfig
from peftlab.core.peft_model import PeftModel, get_peft_model
from peftlab.data.catalog import get_task
from peftlab.devices import Precision
from peftlab.models import DEFAULT_CAUSAL_LM, load_causal_lm, quiet
from peftlab.presets import PRESETS, MethodPreset
from peftlab.training.encoding import encode_examples, pad_id
from peftlab.training.evaluation import EvalResult, evaluate_task
from peftlab.training.loop import TrainConfig, train

TASK = "structured"
SHOWN = 3  # generations shown before/after
# adapter name (also the label printed) -> its preset; IA3 scales by vectors near 1 and takes
# a much larger learning rate than LoRA
RUNS: dict[str, MethodPreset] = {"LoRA": PRESETS["lora"], "IA3": PRESETS["ia3"]}


def _one_line(text: str, width: int = 96) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _metrics(result: EvalResult) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())


def _targets(model: PeftModel, adapter: str) -> str:
    # adapter modules live at "<module path>.adapters.<name>"; show the module names once each
    names = {path.split(".adapters.")[0].rsplit(".", 1)[-1] for path, _ in model.adapter_modules(adapter)}
    return ", ".join(sorted(names))


def _config(preset: MethodPreset, base: torch.nn.Module) -> PeftConfig:
    config = preset.config(getattr(base, "config", None))
    assert config is not None
    return config


def run_demo(
    *,
    steps: int = 24,
    seed: int = 0,
    batch_size: int = 8,
    num_eval: int = 24,
    model_name: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    verbose: bool = False,
) -> dict[str, EvalResult]:
    """Train LoRA and IA3 on one base model in turn, printing the tour; returns the evaluations
    (``"base"`` and one per adapter). ``device`` / ``dtype`` as in :mod:`peftlab.devices`."""
    if steps < 1 or batch_size < 1 or num_eval < 1:
        raise ValueError("--steps, --batch-size and --num-eval must be at least 1")
    precision = Precision.resolve(device, dtype)
    task = get_task(TASK, seed=seed, num_eval=num_eval)
    label = model_name or DEFAULT_CAUSAL_LM
    print(f"peftlab demo: LoRA and IA3 on {label}, task '{task.name}' ({task.description})")

    start = time.perf_counter()
    base, tokenizer = load_causal_lm(
        model_name, dtype=precision.dtype, device=precision.device, verbose=verbose
    )
    total = sum(p.numel() for p in base.parameters())
    print(
        f"loaded {label} ({precision.describe()}): {total:,d} parameters in "
        f"{time.perf_counter() - start:.1f} s; "
        f"{len(task.train)} training and {len(task.eval)} eval examples\n"
    )
    data = encode_examples(tokenizer, task.train)

    # adapter initialisation (LoRA's A) draws from torch's global RNG
    torch.manual_seed(seed)
    names = list(RUNS)
    model = get_peft_model(base, _config(RUNS[names[0]], base), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _config(RUNS[name], base))

    results: dict[str, EvalResult] = {}
    times: dict[str, float] = {}
    params: dict[str, int] = {}
    with quiet(verbose):
        print("== base model (adapters disabled) ==")
        with model.disable_adapter():
            results["base"] = evaluate_task(model, tokenizer, task, precision=precision)
        print(f"eval: {_metrics(results['base'])}  ({results['base'].seconds:.1f} s)\n")

        for name, preset in RUNS.items():
            model.train_adapter(name)
            params[name] = model.get_nb_trainable_parameters()[0]
            print(f"== {name} on {_targets(model, name)} ==")
            model.print_trainable_parameters()
            config = TrainConfig(
                steps=steps,
                batch_size=batch_size,
                learning_rate=preset.learning_rate,
                warmup_steps=min(3, steps - 1),
                seed=seed,
            )
            history = train(
                model, data, config, pad_token_id=pad_id(tokenizer), desc=f"train {name}", precision=precision
            )
            times[name] = history.total_time
            print(
                f"loss {history.losses[0]:.3f} -> {history.losses[-1]:.3f} in {history.total_time:.1f} s "
                f"({history.tokens_per_second:.0f} tokens/s)"
            )
            model.eval()
            results[name] = evaluate_task(model, tokenizer, task, precision=precision)
            print(f"eval: {_metrics(results[name])}  ({results[name].seconds:.1f} s)\n")

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
    for name in RUNS:
        after = results[name].metrics[metric]
        print(f"{name:8s} {params[name]:>16,d} {times[name]:>9.1f}s  {before:.3f} -> {after:.3f}")
    return results
