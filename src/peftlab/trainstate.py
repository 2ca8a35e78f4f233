"""Training checkpoints: one folder per step, written atomically, read without pickle.

``OUT/checkpoints/step-N/`` holds everything a run needs to continue exactly where it was:

| file | content |
|---|---|
| ``trainable.safetensors`` | the trainable parameters, by their names in the model |
| ``adapter/`` | the adapter in PEFT's format (not for full fine-tuning) |
| ``optimizer.json`` + ``.safetensors`` | the optimizer state: structure and scalars / tensors |
| ``trainer_state.json`` + ``.safetensors`` | step, data position, scheduler, history, RNG states |
| ``run_config.json`` | the settings of the run |

Nested state (dicts, lists, tuples, numbers, strings, tensors) is split by :func:`encode_state`
into JSON and a flat map of tensors saved as safetensors; nothing is ever unpickled. A folder is
staged as ``.step-N.tmp-*`` beside the others, every file fsynced, then renamed into place, so
a ``step-N`` folder is always complete; a crash leaves at most a temporary folder, which the
next save removes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing, damaged or belongs to another run."""


# ---- nested state <-> JSON + tensors ------------------------------------------------------


def encode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors`` (by a generated key)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # own, contiguous CPU copies: safetensors refuses shared or strided storage
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [encode_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors) for k, v in obj.items()}
        # non-string keys (the optimizer's parameter indices) keep their type as pairs
        return {_ITEMS: [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a training checkpoint")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {_TENSOR}:
        try:
            return tensors[obj[_TENSOR]]
        except KeyError:
            raise TrainCheckpointError(f"tensor {obj[_TENSOR]!r} is missing from the checkpoint") from None
    if set(obj) == {_TUPLE}:
        return tuple(decode_state(v, tensors) for v in obj[_TUPLE])
    if set(obj) == {_ITEMS}:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj[_ITEMS]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


# ---- atomic folders -----------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a fsynced temporary sibling and a rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write_json(tmp, data)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent)


def write_state(folder: Path, name: str, state: Any) -> None:
    """``folder/name.json`` + ``folder/name.safetensors`` for a nested state."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})
    # compact: the data position alone lists up to one index per training example
    text = json.dumps({"format": FORMAT_VERSION, "state": encoded}, separators=(",", ":"))
    (folder / f"{name}.json").write_text(text + "\n", encoding="utf-8")


def read_state(folder: Path, name: str) -> Any:
    tensors = read_tensors(folder / f"{name}.safetensors")
    data = read_json(folder / f"{name}.json")
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or "state" not in data:
        raise TrainCheckpointError(f"{folder / name}.json is not a peftlab training state (format 1)")
    return decode_state(data["state"], tensors)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainCheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrainCheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainCheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for every header problem
        raise TrainCheckpointError(f"{path} is truncated or corrupt ({err})") from None


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """Complete ``step-N`` folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    folders = step_folders(root)
    return folders[-1][1] if folders else None


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Stage a folder with ``write(folder)``, fsync it, rename it to ``root/step-<step>`` and
    keep only the ``keep`` newest step folders."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():  # a step saved again after resuming from an older checkpoint
            old = root / f".step-{step}.tmp-{secrets.token_hex(6)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old_folder in step_folders(root)[:-keep]:
        shutil.rmtree(old_folder, ignore_errors=True)
    return final
