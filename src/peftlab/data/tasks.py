"""What every data source becomes: a :class:`Task` of :class:`Example` pairs with a scorer.

Built-in generated tasks are in :mod:`peftlab.data.generated`, user files and Hugging Face
datasets in :mod:`peftlab.data.files`, Rotten Tomatoes in :mod:`peftlab.data.rotten_tomatoes`;
:mod:`peftlab.data.catalog` finds a built-in task by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Scorer = Callable[[Sequence[str], Sequence[str]], dict[str, float]]


@dataclass(frozen=True)
class Example:
    """One training or evaluation pair; the model sees ``prompt`` and learns ``completion``.

    Classification examples also keep the raw ``text`` and its ``label`` name, which an encoder
    with a classification head uses instead of the prompt. Chat examples keep their turns as
    ``messages`` ((role, content) pairs ending with an assistant turn): ``completion`` is the last
    assistant turn and ``prompt`` a plain-text view of the turns before it (for reports and
    splitting); they are encoded with a chat template
    (:class:`peftlab.training.fitting.PromptFormat`).
    """

    prompt: str
    completion: str
    text: str | None = None
    label: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    source: str | None = field(default=None, compare=False)  # where it came from, e.g. "train.jsonl:12"


@dataclass(frozen=True)
class Task:
    """A named dataset with a train split, an eval split and a way to score generations.

    ``metric`` names the key of :meth:`score`'s result that sums the task up (higher is better);
    ``max_new_tokens`` is enough for any reference completion. ``labels`` (non-empty for
    classification) are the class names in a fixed order; ``info`` describes where the data
    came from and what was dropped on the way (counts, reasons), for reports.
    """

    name: str
    description: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    scorer: Scorer
    metric: str
    max_new_tokens: int
    labels: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_classification(self) -> bool:
        return bool(self.labels)

    def score(self, predictions: Sequence[str], references: Sequence[str] | None = None) -> dict[str, float]:
        """Score generated completions against ``references`` (default: this task's eval split)."""
        refs = [ex.completion for ex in self.eval] if references is None else list(references)
        if len(predictions) != len(refs):
            raise ValueError(
                f"{self.name}: got {len(predictions)} predictions for {len(refs)} references; "
                "score one prediction per reference"
            )
        if not refs:
            raise ValueError(f"{self.name}: nothing to score (no references)")
        return self.scorer(predictions, refs)
