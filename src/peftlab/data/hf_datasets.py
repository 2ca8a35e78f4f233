"""Hugging Face datasets as tasks (``--hf-dataset NAME[:CONFIG]``, needs ``peftlab[hf]``): a
dataset's ``train`` split, evaluated on its ``validation`` or ``test`` split when it has one,
its rows read and checked as a user's file's are (:mod:`peftlab.data.files`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from peftlab.data.files import RowReport, collect_records, task_from_records
from peftlab.data.tasks import Task
from peftlab.extras import require

TEXT_COLUMNS = ("text", "sentence", "content", "review")
EVAL_SPLITS = ("validation", "test")


def _hf_rows(
    split: Any, split_name: str, spec: str, kind: str, text_column: str, report: RowReport
) -> Iterable[tuple[str, dict[str, Any]]]:
    """Rows of one split under peftlab's field names; ClassLabel ids become their names."""
    label_names: list[str] | None = None
    if kind == "classification":
        feature = getattr(split, "features", {}).get("label")
        label_names = list(getattr(feature, "names", None) or []) or None
    for index, row in enumerate(split):
        report.rows_read += 1
        where = f"{spec}[{split_name}] row {index}"
        if kind == "generation":
            yield where, {"prompt": row.get("prompt"), "completion": row.get("completion")}
            continue
        if kind == "chat":
            yield where, {"messages": row.get("messages")}
            continue
        label = row.get("label")
        if label_names is not None and isinstance(label, int) and not isinstance(label, bool):
            # datasets marks unlabelled rows (e.g. GLUE test splits) with -1
            label = label_names[label] if 0 <= label < len(label_names) else None
        yield where, {"text": row.get(text_column), "label": label}


def _hf_kind(columns: Sequence[str], spec: str) -> tuple[str, str]:
    if "messages" in columns:
        return "chat", "messages"
    if "prompt" in columns and "completion" in columns:
        return "generation", "prompt"
    text = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text is not None and "label" in columns:
        return "classification", text
    raise ValueError(
        f"--hf-dataset {spec}: columns {', '.join(columns)} are neither messages (chat), "
        f"prompt/completion nor label with one of {', '.join(TEXT_COLUMNS)}; rename them (datasets' "
        "rename_column) and export to JSONL for --data"
    )


def load_hf_dataset(spec: str) -> Any:
    """``datasets.load_dataset(NAME, CONFIG)`` for ``NAME[:CONFIG]``, with errors that say what to do."""
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(f"--hf-dataset {spec!r}: expected NAME or NAME:CONFIG")
    datasets = require("datasets", "--hf-dataset (or export the data to JSONL and pass --data)")
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as err:  # datasets raises many types (network, missing cache, bad config)
        raise RuntimeError(
            f"--hf-dataset {spec}: could not load it ({type(err).__name__}: {err}). Loading needs "
            "network access to the Hugging Face Hub the first time, or a copy in the datasets "
            "cache (~/.cache/huggingface/datasets) when offline (HF_DATASETS_OFFLINE=1); check the "
            "name and config, or export the data to JSONL and pass --data"
        ) from err


def task_from_hf_dataset(
    spec: str, *, eval_fraction: float = 0.2, seed: int = 0, max_new_tokens: int | None = None
) -> Task:
    """A task from a Hugging Face dataset: its ``train`` split, evaluated on ``validation`` or
    ``test`` when it has one (else ``eval_fraction`` of train, split as for files)."""
    dataset = load_hf_dataset(spec)
    splits = list(dataset.keys())
    if "train" not in splits:
        raise ValueError(f"--hf-dataset {spec}: no 'train' split (splits: {', '.join(splits)})")
    train_split = dataset["train"]
    kind, text_column = _hf_kind(list(train_split.column_names), spec)
    report = RowReport(f"{spec}[train]")
    records = collect_records(
        _hf_rows(train_split, "train", spec, kind, text_column, report), report, kind=kind
    )
    held = None
    eval_name = next((s for s in EVAL_SPLITS if s in splits), None)
    if eval_name is not None:
        held_report = RowReport(f"{spec}[{eval_name}]")
        held = collect_records(
            _hf_rows(dataset[eval_name], eval_name, spec, kind, text_column, held_report),
            held_report,
            kind=kind,
        )
    return task_from_records(
        spec.replace("/", "_").replace(":", "_"),
        f"Hugging Face dataset {spec}",
        records,
        held,
        eval_fraction=eval_fraction,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
