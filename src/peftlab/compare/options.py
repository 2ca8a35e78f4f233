"""What a ``peftlab compare`` run compares, and how big it is."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftlab.data.tasks import Task
from peftlab.presets import PRESETS

DEFAULT_METHODS = tuple(name for name, p in PRESETS.items() if p.in_default)
SEARCH_EFFORTS = ("none", "quick", "full")
# the learning rates a search tries, as multiples of the preset's, in the order tried (the
# preset first, so the pruner has a sensible reference early)
SEARCH_GRIDS: dict[str, tuple[float, ...]] = {
    "none": (1.0,),
    "quick": (1.0, 3.0, 1 / 3),
    "full": (1.0, 3.0, 1 / 3, 9.0, 1 / 9),
}

# Run sizes. ``budget``: training examples every method sees at most (the same for all, so
# methods differ in what they learn from the same data, not in steps at other batch sizes);
# ``eval_every``: examples between validation losses (early stopping and pruning decide on
# them); ``patience``: validations without a better loss before a final run stops;
# ``search_budget``: the longest a search trial trains; ``val_size``: validation rows carved from
# the training data; ``num_eval``: test rows scored (None: all). A search trial is the first
# ``search_budget`` examples of its final run (same schedule), and the chosen one goes on, so a
# method costs about budget + (trials - 1) x search_budget examples. Sized so a default run takes
# about 25 minutes on 2 CPU cores (MiniLM is ~6x smaller than SmolLM2-135M, so it affords more).
RUN_SIZES: dict[str, dict[str, int | None]] = {
    "generation": {
        "budget": 480,
        "batch_size": 8,
        "eval_every": 96,
        "patience": 2,
        "search_budget": 288,
        "val_size": 32,
        "num_eval": 64,
    },
    "causal-classification": {
        "budget": 720,
        "batch_size": 8,
        "eval_every": 80,
        "patience": 4,
        "search_budget": 160,
        "val_size": 96,
        "num_eval": 400,
    },
    "encoder-classification": {
        "budget": 8000,
        "batch_size": 16,
        "eval_every": 400,
        "patience": 3,
        "search_budget": 1600,
        "val_size": 384,
        "num_eval": None,
    },
}
# what --quick sets (on any kind): a small run of a few minutes, no search
QUICK: dict[str, Any] = {
    "budget": 48,
    "eval_every": 24,
    "search_budget": 24,
    "val_size": 8,
    "num_eval": 16,
    "latency_repeats": 2,
    "search": "none",
}
QUICK_TASK = "topic"  # the default task of a quick run on a causal LM (generated, offline)
# sizes the command line can set
SIZE_FIELDS = ("budget", "batch_size", "seq_len", "num_eval")


@dataclass
class CompareOptions:
    """What to compare; ``None`` sizes take the defaults of :data:`RUN_SIZES` for the run's kind
    (``seq_len`` None: chosen from the data, see :mod:`peftlab.training.fitting`)."""

    model: str | None = None
    gguf_file: str | None = None
    task: str | None = None
    data: str | None = None
    hf_dataset: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.2
    methods: tuple[str, ...] = DEFAULT_METHODS
    budget: int | None = None
    steps: int | None = None  # instead of budget: steps x batch size
    batch_size: int | None = None
    seq_len: int | None = None
    seeds: int = 1
    num_eval: int | None = None
    latency_repeats: int = 5
    metric: str | None = None
    out: str = "peftlab-compare"
    quick: bool = False
    search: str = "quick"
    workers: int = 1
    storage: str | None = None
    threads: int | None = None
    command: str = ""
    learning_rates: dict[str, float] = field(default_factory=dict)
    # set by --quick; None: RUN_SIZES
    eval_every: int | None = None
    search_budget: int | None = None
    val_size: int | None = None
    # where and in which precision (peftlab.devices), and how rows are encoded (training.fitting)
    device: str = "auto"
    dtype: str = "auto"
    # None: chat rows through the tokenizer's template, prompt/completion rows as plain text
    chat_template: str | None = None

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in PRESETS]
        if unknown or not self.methods:
            raise ValueError(
                f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(PRESETS)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods: a method is listed twice in {list(self.methods)}")
        if self.steps is not None and self.budget is not None and not self.quick:
            raise ValueError("give either --budget or --steps, not both")
        for name in (
            "budget",
            "steps",
            "batch_size",
            "seq_len",
            "seeds",
            "num_eval",
            "latency_repeats",
            "workers",
        ):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.search not in SEARCH_EFFORTS:
            raise ValueError(f"--search {self.search!r}: choose one of {', '.join(SEARCH_EFFORTS)}")
        for name, lr in self.learning_rates.items():
            if name not in PRESETS:
                raise ValueError(
                    f"--lr {name}={lr}: {name!r} is not a method; choose from {', '.join(PRESETS)}"
                )
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"--lr {name}={lr}: the learning rate must be a number > 0")
        if sum(bool(x) for x in (self.task, self.data, self.hf_dataset)) > 1:
            raise ValueError("give either --task or --data or --hf-dataset, not more than one")
        if self.eval_data and not self.data:
            raise ValueError("--eval-data needs --data (the training file)")

    def settings(self) -> dict[str, Any]:
        """What decides the results (a rerun into the same state must agree on all of it).
        Adding methods or seeds, workers and threads do not change a finished run's figures."""
        keys = (
            "model",
            "gguf_file",
            "task",
            "data",
            "hf_dataset",
            "eval_data",
            "eval_fraction",
            "budget",
            "steps",
            "batch_size",
            "seq_len",
            "num_eval",
            "quick",
            "search",
            "learning_rates",
            "eval_every",
            "search_budget",
            "val_size",
            "dtype",
            "chat_template",
        )
        return {k: getattr(self, k) for k in keys}


def run_kind(model_kind: str, task: Task) -> str:
    """``generation`` (the built-in generated tasks and prompt/completion data on a causal LM),
    ``causal-classification`` or ``encoder-classification``."""
    if model_kind == "encoder":
        if not task.is_classification:
            raise ValueError(
                f"task {task.name!r} is prompt/completion data, but an encoder with a classification "
                "head needs text/label data (--task rotten-tomatoes, or --data with text,label "
                "columns); use a causal LM for generation"
            )
        return "encoder-classification"
    return "causal-classification" if task.is_classification else "generation"


def resolve_sizes(opts: CompareOptions, kind: str) -> dict[str, Any]:
    sizes: dict[str, Any] = dict(RUN_SIZES[kind])
    for name in (*SIZE_FIELDS, "eval_every", "search_budget", "val_size"):
        value = getattr(opts, name, None)
        if value is not None:
            sizes[name] = int(value)
    if opts.steps is not None:
        sizes["budget"] = opts.steps * sizes["batch_size"]
    sizes["search_budget"] = min(sizes["search_budget"], sizes["budget"])
    return sizes
