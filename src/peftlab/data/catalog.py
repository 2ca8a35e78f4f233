"""The built-in tasks by name: the generated ones and Rotten Tomatoes (real data, fetched once)."""

from __future__ import annotations

from peftlab.data.generated import TASKS, generated_task
from peftlab.data.tasks import Task

# real-data tasks: loaded (and fetched once) on demand, with a fixed split the seed does not change
REAL_TASKS = ("rotten-tomatoes",)


def task_names() -> list[str]:
    return sorted([*TASKS, *REAL_TASKS])


def get_task(name: str, *, seed: int = 0, num_train: int | None = None, num_eval: int | None = None) -> Task:
    """A built-in task by name; the same ``seed`` always gives the same splits.

    ``rotten-tomatoes`` keeps its one documented split whatever the seed; ``num_train`` /
    ``num_eval`` take the first examples of each split (still stratified by label).
    """
    if name == "rotten-tomatoes":
        from peftlab.data.rotten_tomatoes import rotten_tomatoes_task

        return rotten_tomatoes_task(num_train=num_train, num_eval=num_eval)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks are: {', '.join(task_names())}")
    return generated_task(name, seed=seed, num_train=num_train, num_eval=num_eval)
