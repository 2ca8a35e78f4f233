"""Training: one run preparation for every command that trains (:mod:`.preparation`), rows as
tokens (:mod:`.encoding`, :mod:`.fitting`), the one train loop (:mod:`.loop`) and held-out
evaluation (:mod:`.evaluation`), the output head at supervised positions (:mod:`.lm_head`) and
the memory model (:mod:`.memory`), classification heads (:mod:`.classify`), ``peftlab train``
(:mod:`.settings`, :mod:`.run`, :mod:`.checkpoints`) and data parallelism (:mod:`.distributed`)."""

from peftlab.training.encoding import encode_examples
from peftlab.training.evaluation import EvalResult, evaluate_loss, evaluate_task, generate
from peftlab.training.loop import TrainConfig, TrainHistory, TrainLoop, train

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainHistory",
    "TrainLoop",
    "encode_examples",
    "evaluate_loss",
    "evaluate_task",
    "generate",
    "train",
]
