"""What a ``peftlab compare`` run compares, and how big it is."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlab.data.tasks import Task
from peftlab.presets import PRESETS

DEFAULT_METHODS = tuple(PRESETS)

# Run sizes (steps, batch, max tokens, scored eval examples). The generated tasks keep compare's
# original sizes; real classification data gets more steps and eval examples so accuracy
# differences mean something, sized so a default run takes about 10 minutes on 2 CPU cores
# (MiniLM is ~6x smaller than SmolLM2-135M, so it can afford much more of both).
RUN_SIZES: dict[str, dict[str, int]] = {
    "generation": {"steps": 30, "batch_size": 4, "seq_len": 128, "num_eval": 32},
    "causal-classification": {"steps": 40, "batch_size": 6, "seq_len": 96, "num_eval": 200},
    "encoder-classification": {"steps": 150, "batch_size": 16, "seq_len": 80, "num_eval": 1275},
}
SIZE_FIELDS = ("steps", "batch_size", "seq_len", "num_eval")


@dataclass
class CompareOptions:
    """What to compare; ``None`` sizes take the defaults of :data:`RUN_SIZES` for the run's kind."""

    model: str | None = None
    gguf_file: str | None = None
    task: str | None = None
    data: str | None = None
    hf_dataset: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.2
    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    seeds: int = 1
    num_eval: int | None = None
    latency_repeats: int = 5
    metric: str | None = None
    out: str = "peftlab-compare"
    quick: bool = False
    threads: int | None = None
    command: str = ""
    learning_rates: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in PRESETS]
        if unknown or not self.methods:
            raise ValueError(
                f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(PRESETS)}"
            )
        for name in ("steps", "batch_size", "seq_len", "seeds", "num_eval", "latency_repeats"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if sum(bool(x) for x in (self.task, self.data, self.hf_dataset)) > 1:
            raise ValueError("give either --task or --data or --hf-dataset, not more than one")
        if self.eval_data and not self.data:
            raise ValueError("--eval-data needs --data (the training file)")


QUICK = {"steps": 8, "num_eval": 16, "seq_len": 64, "latency_repeats": 3, "task": "topic"}


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


def resolve_sizes(opts: CompareOptions, kind: str) -> dict[str, int]:
    sizes = dict(RUN_SIZES[kind])
    for name in SIZE_FIELDS:
        value = getattr(opts, name)
        if value is not None:
            sizes[name] = int(value)
    return sizes
