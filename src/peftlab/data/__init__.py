"""Data for training and evaluation: every source (built-in generated tasks, Rotten Tomatoes,
JSONL/CSV files, Hugging Face datasets) becomes a :class:`~peftlab.data.tasks.Task`."""

from peftlab.data.catalog import get_task, task_names
from peftlab.data.files import task_from_files
from peftlab.data.hf_datasets import task_from_hf_dataset
from peftlab.data.tasks import Example, Task

__all__ = ["Example", "Task", "get_task", "task_from_files", "task_from_hf_dataset", "task_names"]
