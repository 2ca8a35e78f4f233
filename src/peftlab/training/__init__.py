"""Training: the one train/eval loop every command shares (:mod:`.loop`), classification heads
in it (:mod:`.classify`), ``peftlab train`` runs with checkpoints and resume (:mod:`.run`,
:mod:`.checkpoints`) and data parallelism (:mod:`.distributed`)."""

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
