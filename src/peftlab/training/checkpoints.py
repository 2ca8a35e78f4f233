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
staged as a temporary folder beside the others, every file fsynced, then renamed into place
(:func:`peftlab.core.atomic.folder`), so a ``step-N`` folder is always complete; a crash leaves at
most a temporary folder, which the next save removes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core import atomic
from peftlab.core.peft_model import PeftModel
from peftlab.training.loop import TrainLoop
from peftlab.training.settings import RESUMABLE_CHANGES, RunConfig

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


# ---- files -------------------------------------------------------------------------------


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
    """Stage a folder with ``write(folder)``, rename it to ``root/step-<step>`` atomically and
    keep only the ``keep`` newest step folders."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root.mkdir(parents=True, exist_ok=True)
    atomic.remove_temps(root, "step-*")  # left by a crash during an earlier save
    final = root / f"step-{step}"
    # a step can be saved again after resuming from an older checkpoint: replace it
    with atomic.folder(final, replace=True) as tmp:
        write(tmp)
    for _, old_folder in step_folders(root)[:-keep]:
        shutil.rmtree(old_folder, ignore_errors=True)
    return final


# ---- a training run's checkpoint ----------------------------------------------------------


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a checkpoint saves: the parameters that train, by their names in the model."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def setting_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ between a checkpoint's run and this one, beyond those a resumed
    run may change."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
    # a run saved before a setting existed ran with that setting's default
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    saved = {k: saved.get(k, defaults.get(k)) for k in keys}
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_run_checkpoint(
    folder: Path, model: nn.Module, config: RunConfig, world_size: int, fingerprint: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the checkpoint against this run, copy the trainable parameters in, and return
    (trainer state, optimizer state)."""
    saved = read_json(folder / "run_config.json")
    if not isinstance(saved, dict):
        raise TrainCheckpointError(f"{folder}/run_config.json is not a mapping; the checkpoint is damaged")
    diffs = setting_differences(saved, config.to_dict())
    if diffs:
        raise ValueError(
            f"--resume: {folder} belongs to a run with other settings ({'; '.join(diffs)}). Resume with "
            "the settings it was started with, or train into a new --out"
        )
    trainer = read_state(folder, "trainer_state")
    if trainer["world_size"] != world_size:
        raise ValueError(
            f"--resume: {folder} was written by {trainer['world_size']} processes but this run has "
            f"{world_size}; resume with the same number of processes (the data shards and RNG "
            "streams are per process)"
        )
    if trainer["data_sha256"] != fingerprint:
        raise ValueError(
            f"--resume: the training data differs from what {folder} was trained on (the file or the "
            "tokenizer changed); resume with the same data, or train into a new --out"
        )
    copy_trainable(folder, model)
    return trainer, read_state(folder, "optimizer")


def copy_trainable(folder: Path, model: nn.Module) -> None:
    """Put the checkpoint's trainable parameters into ``model``, after checking names and shapes."""
    tensors = read_tensors(folder / "trainable.safetensors")
    params = trainable_parameters(model)
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise TrainCheckpointError(
            f"{folder}: the saved parameters do not match this model's trainable ones "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise TrainCheckpointError(
                    f"{folder}: {name} has shape {tuple(tensors[name].shape)}, "
                    f"the model needs {tuple(param.shape)}"
                )
            param.copy_(tensors[name])


def write_run_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    loop: TrainLoop,
    config: RunConfig,
    rng: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    fingerprint: str,
) -> None:
    """Everything :func:`load_run_checkpoint` reads back, into the staged ``folder``."""
    from safetensors.torch import save_file

    params = {n: p.detach().to("cpu").contiguous().clone() for n, p in trainable_parameters(model).items()}
    save_file(params, str(folder / "trainable.safetensors"), metadata={"format": "pt"})
    if isinstance(model, PeftModel):
        model.save_pretrained(folder / "adapter")
    state = loop.state_dict()
    write_state(folder, "optimizer", state.pop("optimizer"))
    state.update(
        world_size=loop.world_size,
        total_steps=loop.config.steps,
        epoch=loop.batches.epoch,
        rng=rng,
        evals=evals,
        data_sha256=fingerprint,
    )
    write_state(folder, "trainer_state", state)
    atomic.write_json(folder / "run_config.json", config.to_dict())
