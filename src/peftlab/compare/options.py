"""What a ``peftlab compare`` run compares, and how big it is: checked and resolved once.

:class:`CompareOptions` is what the user asked for (``None`` where they left a choice to the
run); :func:`resolve_options` validates it and fills the choices ``--quick`` changes;
:meth:`RunSizes.resolve` gives the run's sizes for its kind of model and data.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from peftlab.data.tasks import Task
from peftlab.models import model_kind
from peftlab.presets import PRESETS
from peftlab.training.memory import check_max_memory
from peftlab.training.preparation import MEMORY_BUDGET_BYTES


def default_methods(kind: str) -> tuple[str, ...]:
    """The methods compare runs without ``--methods`` on a model of ``kind``
    (:func:`peftlab.models.model_kind`): ``prefix-all`` only on encoder-decoders."""
    return tuple(name for name, p in PRESETS.items() if p.in_default and p.applies_to(kind))


DEFAULT_METHODS = default_methods("causal")
SEARCH_EFFORTS = ("none", "quick", "full")
# the learning rates a search tries, as multiples of the preset's, in the order tried (the
# preset first, so the pruner has a sensible reference early)
SEARCH_GRIDS: dict[str, tuple[float, ...]] = {
    "none": (1.0,),
    "quick": (1.0, 3.0, 1 / 3),
    "full": (1.0, 3.0, 1 / 3, 9.0, 1 / 9),
}
DEFAULT_TASK = "rotten-tomatoes"
QUICK_TASK = "topic"  # the default task of a quick run on a causal LM (generated, offline)
DEFAULT_LATENCY_REPEATS = 5
QUICK_LATENCY_REPEATS = 2
CURVE_EPOCHS = 4  # the most passes a data-size curve's point makes over its training rows


@dataclass(frozen=True)
class RunSizes:
    """How much a comparison trains and measures, the same for every method.

    ``budget``: training examples every method sees at most (the same for all, so methods differ
    in what they learn from the same data, not in steps at other batch sizes); ``eval_every``:
    examples between validation losses (early stopping and pruning decide on them);
    ``patience``: validations without a better loss before a final run stops; ``search_budget``:
    the longest a search trial trains; ``val_size``: validation rows carved from the training
    data; ``num_eval``: test rows scored (None: all); ``memory_budget``: the activation bytes one
    batch may take at the length chosen from the data. A search trial is the first
    ``search_budget`` examples of its final run (same schedule), and the chosen one goes on, so a
    method costs about budget + (trials - 1) x search_budget examples.
    """

    budget: int
    batch_size: int
    eval_every: int
    patience: int
    search_budget: int
    val_size: int
    num_eval: int | None
    memory_budget: int = MEMORY_BUDGET_BYTES

    def settings(self) -> dict[str, Any]:
        """The sizes a rerun into the same comparison must agree on (the memory budget only
        matters through the length it chooses, which the data fingerprint covers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "memory_budget"}

    def for_train_size(self, rows: int) -> RunSizes:
        """The sizes of a data-size curve's point with ``rows`` training examples: every method
        and size on one rule, early stopping deciding within it. The budget is up to
        :data:`CURVE_EPOCHS` passes over the rows, but no more than the run's own budget unless
        that would not cover the rows once (small sets train several epochs, the largest at
        least one); validation interval and search budget keep their share of the budget."""
        budget = min(CURVE_EPOCHS * rows, max(self.budget, rows))
        budget = max(self.batch_size, budget // self.batch_size * self.batch_size)
        share = budget / self.budget
        return dataclasses.replace(
            self,
            budget=budget,
            eval_every=max(self.batch_size, round(self.eval_every * share)),
            search_budget=min(budget, max(self.batch_size, round(self.search_budget * share))),
        )

    @classmethod
    def resolve(cls, opts: CompareOptions, kind: str) -> RunSizes:
        """The defaults of ``kind`` (:data:`RUN_SIZES`), then ``--quick``'s, then what was given."""
        sizes = dataclasses.replace(RUN_SIZES[kind], **(QUICK_SIZES if opts.quick else {}))
        given = {
            name: int(getattr(opts, name))
            for name in ("budget", "batch_size", "num_eval", "eval_every", "search_budget", "val_size")
            if getattr(opts, name) is not None
        }
        sizes = dataclasses.replace(sizes, **given)
        if opts.steps is not None:
            sizes = dataclasses.replace(sizes, budget=opts.steps * sizes.batch_size)
        return dataclasses.replace(sizes, search_budget=min(sizes.search_budget, sizes.budget))


# Sized so a default run takes about 25 minutes on 2 CPU cores (MiniLM is ~6x smaller than
# SmolLM2-135M, so it affords more).
RUN_SIZES: dict[str, RunSizes] = {
    "generation": RunSizes(
        budget=480, batch_size=8, eval_every=96, patience=2, search_budget=288, val_size=32, num_eval=64
    ),
    "causal-classification": RunSizes(
        budget=720, batch_size=8, eval_every=80, patience=4, search_budget=160, val_size=96, num_eval=400
    ),
    "encoder-classification": RunSizes(
        budget=8000,
        batch_size=16,
        eval_every=400,
        patience=3,
        search_budget=1600,
        val_size=384,
        num_eval=None,
    ),
}
# what --quick sets on any kind: a small run of a few minutes (and no search, see resolve_options)
QUICK_SIZES: dict[str, int] = {
    "budget": 48,
    "eval_every": 24,
    "search_budget": 24,
    "val_size": 8,
    "num_eval": 16,
    "memory_budget": MEMORY_BUDGET_BYTES // 4,
}


@dataclass
class CompareOptions:
    """What to compare. ``None`` leaves the choice to the run: sizes take :data:`RUN_SIZES` for
    the run's kind (``--quick``: :data:`QUICK_SIZES`), ``seq_len`` is chosen from the data (see
    :mod:`peftlab.training.fitting`), ``task``, ``search`` and ``latency_repeats`` are resolved
    by :func:`resolve_options`."""

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
    latency_repeats: int | None = None
    metric: str | None = None
    out: str = "peftlab-compare"
    quick: bool = False
    search: str | None = None
    workers: int = 1
    storage: str | None = None
    threads: int | None = None
    command: str = ""
    learning_rates: dict[str, float] = field(default_factory=dict)
    eval_every: int | None = None
    search_budget: int | None = None
    val_size: int | None = None
    # where and in which precision (peftlab.devices), and how rows are encoded (training.fitting)
    device: str = "auto"
    dtype: str = "auto"
    # None: chat rows through the tokenizer's template, prompt/completion rows as plain text
    chat_template: str | None = None
    # training-set sizes of the data-size curves (None: one comparison on every training row)
    sizes: tuple[int, ...] | None = None
    # the text forgetting is measured on (None: general English prose; "none": not measured)
    retain_data: str | None = None
    # GiB each method's training may take (None: what the device has); see compare.memory_plan
    max_memory: float | None = None

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in PRESETS]
        if unknown or not self.methods:
            raise ValueError(
                f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(PRESETS)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods: a method is listed twice in {list(self.methods)}")
        if self.steps is not None and self.budget is not None:
            raise ValueError("give either --budget or --steps, not both")
        for name in (
            "budget", "steps", "batch_size", "seq_len", "seeds", "num_eval", "latency_repeats", "workers",
            "eval_every", "search_budget", "val_size",
        ):  # fmt: skip
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{flag} must be an integer, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.search is not None and self.search not in SEARCH_EFFORTS:
            raise ValueError(f"--search {self.search!r}: choose one of {', '.join(SEARCH_EFFORTS)}")
        for name, lr in self.learning_rates.items():
            if name not in PRESETS:
                raise ValueError(
                    f"--lr {name}={lr}: expected METHOD=LR with METHOD one of {', '.join(PRESETS)}"
                )
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"--lr {name}={lr}: the learning rate must be > 0 and finite")
        if sum(bool(x) for x in (self.task, self.data, self.hf_dataset)) > 1:
            raise ValueError("give either --task or --data or --hf-dataset, not more than one")
        if self.eval_data and not self.data:
            raise ValueError("--eval-data needs --data (the training file)")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        check_max_memory(self.max_memory)
        self._check_sizes()

    def _check_sizes(self) -> None:
        if self.sizes is None:
            return
        sizes = list(self.sizes)
        if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
            raise ValueError(f"--sizes {sizes}: give training-set sizes as integers >= 1, e.g. 64,256,1024")
        if any(b <= a for a, b in itertools.pairwise(sizes)):
            raise ValueError(f"--sizes {','.join(map(str, sizes))}: sizes must increase, e.g. 64,256,1024")

    def check_sizes_against(self, train_rows: int, batch_size: int) -> None:
        """Refuse sizes the training split cannot hold, or below one batch (before any model loads)."""
        if not self.sizes:
            return
        if self.sizes[-1] > train_rows:
            raise ValueError(
                f"--sizes: {self.sizes[-1]:,} training examples asked for, but the training split holds "
                f"{train_rows:,} (the validation rows held out); use sizes up to {train_rows:,}"
            )
        if self.sizes[0] < batch_size:
            raise ValueError(
                f"--sizes: {self.sizes[0]} is below the batch size {batch_size}; give sizes of at least one "
                "batch (or a smaller --batch-size)"
            )

    def settings(self) -> dict[str, Any]:
        """What decides the results (a rerun into the same state must agree on all of it).
        Adding methods or seeds, workers and threads do not change a finished run's figures."""
        keys = (
            "model", "gguf_file", "task", "data", "hf_dataset", "eval_data", "eval_fraction", "budget",
            "steps", "batch_size", "seq_len", "num_eval", "quick", "search", "learning_rates", "eval_every",
            "search_budget", "val_size", "dtype", "chat_template", "sizes", "retain_data",
        )  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def resolve_options(opts: CompareOptions) -> CompareOptions:
    """``opts`` checked, with the choices left open made: the task (rotten-tomatoes; the small
    generated ``topic`` task for a quick run on a causal LM, whose default would take long), the
    default methods those that apply to the model's kind (``prefix-all`` on encoder-decoders), the
    search effort (quick; none for a quick run) and the latency repeats."""
    opts.validate()
    task = opts.task
    kind = model_kind(opts.model, opts.gguf_file)
    if not (task or opts.data or opts.hf_dataset):
        quick_causal = opts.quick and kind != "encoder"
        task = QUICK_TASK if quick_causal else DEFAULT_TASK
    methods = default_methods(kind) if opts.methods == DEFAULT_METHODS else opts.methods
    misplaced = [m for m in methods if not PRESETS[m].applies_to(kind)]
    if misplaced:
        raise ValueError(
            f"--methods: {', '.join(misplaced)} applies to "
            f"{' and '.join(PRESETS[misplaced[0]].kinds)} models only, and the model is a {kind} model; "
            "drop it from --methods"
        )
    search = opts.search or ("none" if opts.quick else "quick")
    repeats = opts.latency_repeats or (QUICK_LATENCY_REPEATS if opts.quick else DEFAULT_LATENCY_REPEATS)
    return dataclasses.replace(opts, task=task, methods=methods, search=search, latency_repeats=repeats)


def run_kind(model_kind: str, task: Task) -> str:
    """``generation`` (the built-in generated tasks and prompt/completion data on a causal LM or
    an encoder-decoder), ``causal-classification`` (label words scored by a language model,
    causal or encoder-decoder) or ``encoder-classification``."""
    if model_kind == "encoder":
        if not task.is_classification:
            raise ValueError(
                f"task {task.name!r} is prompt/completion data, but an encoder with a classification "
                "head needs text/label data (--task rotten-tomatoes, or --data with text,label "
                "columns); use a causal LM for generation"
            )
        return "encoder-classification"
    return "causal-classification" if task.is_classification else "generation"


@dataclass(frozen=True)
class Unit:
    """One method at one training-set size (None: every training row): what a worker claims,
    searches, trains and records, under :attr:`name` in the comparison's store."""

    method: str
    size: int | None = None

    @property
    def name(self) -> str:
        return self.method if self.size is None else f"{self.method}@{self.size}"


def comparison_units(opts: CompareOptions) -> list[Unit]:
    """Every method at every size, the smallest size first (a curve fills from its cheap end)."""
    return [Unit(method, size) for size in (opts.sizes or (None,)) for method in opts.methods]


def main_size(opts: CompareOptions) -> int | None:
    """The size the comparison table shows: the largest of ``--sizes`` (None: every row)."""
    return opts.sizes[-1] if opts.sizes else None
