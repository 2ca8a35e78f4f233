"""Adapter checkpoints in Hugging Face PEFT's format, written atomically, read defensively.

A checkpoint is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``;
the adapter named ``"default"`` lives in the folder itself, every other adapter in a
sub-folder named after it (PEFT's layout). Keys and config fields are PEFT's, so each
library loads what the other saves.

Nothing is lost on a crash: each file is written to a temporary file in the same folder,
fsynced and renamed into place. The weights are renamed first (the commit point) and carry
the SHA-256 of the config they belong to in their safetensors metadata; a crash between the
two renames leaves the matching config in its temporary file, and the next load or save
finishes the rename. At every moment the folder therefore loads as one consistent save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core import atomic
from peftlab.core.config import TASK_HEADS, PeftConfig
from peftlab.core.host import AdapterHost
from peftlab.core.injection import exact_suffixes, wrapped_modules
from peftlab.core.layers import AdaptedModule, ModulesToSave, is_conv1d
from peftlab.core.registry import method_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
DEFAULT_ADAPTER = "default"
# safetensors metadata entry tying the weights to the exact config bytes saved with them
CONFIG_HASH_KEY = "peftlab_config_sha256"
_PEFT_ROOT = "base_model.model"


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, damaged, or does not fit the model."""


# ---- the PEFT boundary: internal parameters <-> PEFT state-dict keys --------------------
#
# | internal parameter (path in PeftModel)            | PEFT state-dict key                  |
# |---------------------------------------------------|--------------------------------------|
# | base_model.<m>.adapters.<name>.<p>                | base_model.model.<m>.<p>             |
# | base_model.<m>.modules_to_save.<name>.<p>         | base_model.model.<m>.<p>             |
# | trainable bias <b> (bias="all" / "lora_only")     | base_model.model.<b as PEFT nests it>|
# | model_adapters.<name> (prefix tuning)             | Method.export_model_adapter keys     |
#
# <p> is the unit's own parameter name, which each method chooses to be PEFT's (lora_A.weight,
# lora_B.weight, ia3_l; adapter_down/adapter_up for BOTTLENECK). A bias is named where PEFT
# would find it with only this adapter loaded: under ``base_layer`` in a layer this adapter
# wraps. With bias="all", PEFT (which picks biases by name) also stores the biases of a module
# kept in full once more, under ``original_module`` and ``modules_to_save``: peftlab writes
# those rows too, and on load accepts them and ignores them (the copy's own row decides).


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One row of the boundary table for one adapter of one model."""

    peft_key: str
    module: str  # logical module name (for messages)
    param: nn.Parameter
    required: bool = True  # False: written for PEFT fidelity only; never required or loaded


def peft_key_table(model: AdapterHost, adapter_name: str) -> list[KeyEntry]:
    """The boundary table: every module-level parameter of the adapter with its PEFT key.

    Walks the model structure (no name matching) and checks that it covers exactly the
    parameters the adapter declares (``PeftModel.adapter_parameters``).
    """
    biases = {id(p) for p in model.bias_parameters(adapter_name).values()}
    all_biases = getattr(model.peft_config[adapter_name], "bias", "none") == "all"
    entries: list[KeyEntry] = []

    def add(key: str, module: str, param: nn.Parameter, required: bool = True) -> None:
        entries.append(KeyEntry(key, module, param, required))

    def walk(module: nn.Module, key: str, logical: str) -> None:
        if isinstance(module, AdaptedModule):
            if adapter_name in module.adapters:
                for pname, p in module.adapters[adapter_name].named_parameters():
                    add(f"{key}.{pname}", logical, p)
                walk(module.base_layer, f"{key}.base_layer", logical)
            else:
                walk(module.base_layer, key, logical)
            return
        if isinstance(module, ModulesToSave):
            if adapter_name not in module.modules_to_save:
                walk(module.original_module, key, logical)
                return
            copy = module.modules_to_save[adapter_name]
            for pname, p in copy.named_parameters():
                add(f"{key}.{pname}", logical, p)
            if all_biases:
                for part, sub in (("original_module", module.original_module), ("modules_to_save", copy)):
                    for pname, p in sub.named_parameters():
                        if pname.rsplit(".", 1)[-1] == "bias":
                            add(f"{key}.{part}.{pname}", logical, p, required=False)
            return
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in biases:
                add(f"{key}.{pname}", logical, p)
        for cname, child in module.named_children():
            walk(child, f"{key}.{cname}", f"{logical}.{cname}" if logical else cname)

    walk(model.base_model, _PEFT_ROOT, "")
    keys = [e.peft_key for e in entries]
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"internal error: adapter {adapter_name!r} maps two parameters to one PEFT key")
    covered = {id(e.param) for e in entries}
    if adapter_name in model.model_adapters:
        covered |= {id(p) for p in model.model_adapters[adapter_name].parameters()}
    uncovered = [path for path, p in model.adapter_parameters(adapter_name).items() if id(p) not in covered]
    if uncovered:
        raise RuntimeError(f"internal error: no PEFT key for parameters {uncovered[:3]} of {adapter_name!r}")
    return entries


def adapter_state_dict(model: AdapterHost, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's state-dict keys (what ``adapter_model.safetensors`` holds)."""
    state = {e.peft_key: e.param.detach() for e in peft_key_table(model, adapter_name)}
    if adapter_name in model.model_adapters:
        method = method_for(model.peft_config[adapter_name])
        for key, value in method.export_model_adapter(model.model_adapters[adapter_name]).items():
            if key in state:
                raise RuntimeError(f"internal error: model-level key {key!r} collides with a layer key")
            state[key] = value.detach()
    return state


# ---- configs ----------------------------------------------------------------------------
def config_to_peft_dict(model: AdapterHost, adapter_name: str) -> dict[str, Any]:
    """``adapter_config.json`` content: the config plus the bookkeeping fields PEFT writes."""
    config = model.peft_config[adapter_name]
    data = config.to_dict()
    name_or_path = getattr(getattr(model.base_model, "config", None), "_name_or_path", None)
    data["base_model_name_or_path"] = name_or_path or None
    data["revision"] = None
    data["inference_mode"] = True
    wrapped = {n: w for n, w in wrapped_modules(model.base_model) if adapter_name in w.adapters}
    if "fan_in_fan_out" in data:
        # PEFT reads GPT-2's Conv1D (in x out) layout from this flag; peftlab detects it per layer
        data["fan_in_fan_out"] = any(is_conv1d(w.base_layer) for w in wrapped.values())
    # peftlab's None means "this architecture's default", which PEFT resolves from its own
    # tables (they differ, e.g. IA3 on bart and qwen2): write out the modules actually wrapped
    layers = data.get("layers_to_transform")
    if "target_modules" in data and data["target_modules"] is None and wrapped:
        data["target_modules"] = exact_suffixes(model.base_model, set(wrapped), layers)
    if "feedforward_modules" in data and data["feedforward_modules"] is None:
        # PEFT's IA3 "feed-forward" modules are those whose input (not output) is scaled
        scaled_input = {n for n, w in wrapped.items() if w.adapters[adapter_name].stage == "pre"}
        data["feedforward_modules"] = exact_suffixes(model.base_model, scaled_input, layers)
    return data


def config_from_peft_dict(data: dict[str, Any]) -> PeftConfig:
    """A peftlab config from ``adapter_config.json`` content written by PEFT or peftlab."""
    data = dict(data)
    saved = data.get("modules_to_save")
    if isinstance(saved, list):
        # PEFT lists the task head (e.g. "classifier") it adds for SEQ_CLS; peftlab adds it itself
        # when present, and a listed head the model lacks (PEFT adds "score" too) is no error
        heads = next((v for k, v in TASK_HEADS.items() if k.value == data.get("task_type")), ())
        kept = [m for m in saved if m not in heads]
        data["modules_to_save"] = kept or None
    if data.get("feedforward_modules") == []:
        # an explicit "no feed-forward modules", which peftlab spells None once targets are given
        data["feedforward_modules"] = None
    return PeftConfig.from_dict(data)


def parse_config(path: Path, raw: bytes) -> PeftConfig:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; re-save the adapter") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "fix the file or re-save the adapter"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object with the adapter's settings, not {data!r:.60}")
    try:
        return config_from_peft_dict(data)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_adapter_config(model_id: str | os.PathLike[str], subfolder: str | None = None) -> PeftConfig:
    """The config of the adapter saved in ``model_id`` (recovering an interrupted save)."""
    folder = _adapter_folder(model_id, subfolder)
    weights = folder / WEIGHTS_NAME
    meta = _read_metadata(weights) if weights.is_file() else {}
    return parse_config(folder / CONFIG_NAME, _config_bytes(folder, meta))


# ---- files -----------------------------------------------------------------------
def _write_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    # own, contiguous CPU copies: safetensors refuses shared or strided storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    # written through our own file (not save_file, which swaps in a 0600 file of its own)
    with open(path, "wb") as fh:
        fh.write(sorted_metadata(save(tensors, metadata=metadata)))


def sorted_metadata(raw: bytes) -> bytes:
    """safetensors bytes with the ``__metadata__`` entries in sorted order (safetensors writes
    them in a random order), so that saving the same adapter twice gives the same bytes.
    Reordering keys keeps the header's length, hence every data offset."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = header.get("__metadata__")
    if not meta:
        return raw
    ordered = {
        "__metadata__": dict(sorted(meta.items())),
        **{k: v for k, v in header.items() if k != "__metadata__"},
    }
    text = json.dumps(ordered, separators=(",", ":")).encode()
    if len(text) > size:
        return raw  # not safetensors' compact layout: leave it as it is
    return raw[:8] + text.ljust(size) + raw[8 + size :]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pending_config(folder: Path, wanted_hash: str) -> Path | None:
    """The config a crashed save staged but did not rename, if it matches the weights."""
    for tmp in atomic.temps_of(folder, CONFIG_NAME):
        try:
            if _sha256(tmp.read_bytes()) == wanted_hash:
                return tmp
        except OSError:
            continue
    return None


def _config_bytes(folder: Path, weights_meta: dict[str, str]) -> bytes:
    """The config that belongs with the weights, finishing an interrupted save if needed."""
    path = folder / CONFIG_NAME
    current = path.read_bytes() if path.is_file() else None
    wanted = weights_meta.get(CONFIG_HASH_KEY)
    if wanted and (current is None or _sha256(current) != wanted):
        pending = _pending_config(folder, wanted)
        if pending is not None:
            raw = pending.read_bytes()
            try:
                atomic.commit(pending, path)
                note = "the folder is repaired"
            except OSError:
                note = "the folder is read-only, so it stays as it is"
            warnings.warn(
                f"{folder}: a save was interrupted between writing the weights and the config; "
                f"using the config saved with the weights ({note})",
                stacklevel=3,
            )
            return raw
        # else: a config edited by hand or copied in; it is taken as it is
    if current is None:
        raise CheckpointError(_missing_config_message(folder))
    return current


def _missing_config_message(folder: Path) -> str:
    subs = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
    if subs:
        hint = (
            f"it holds adapters in sub-folders {', '.join(subs)}: pass subfolder= (e.g. "
            f"subfolder={subs[0]!r}) or the sub-folder's path"
        )
    elif (folder / "config.json").is_file():
        hint = "it looks like a full model folder (config.json); pass the adapter's folder instead"
    else:
        hint = "pass the folder that save_pretrained() wrote"
    return f"{folder} has no {CONFIG_NAME}, so it is not an adapter checkpoint; {hint}"


# ---- saving -----------------------------------------------------------------------------
_SAVE_OPTIONS = {"safe_serialization", "is_main_process", "save_embedding_layers"}


def save_pretrained(
    model: AdapterHost,
    save_directory: str | os.PathLike[str],
    selected_adapters: list[str] | None = None,
    **kwargs: Any,
) -> None:
    """Save adapters in PEFT's layout: "default" in ``save_directory``, others in sub-folders.

    Accepts PEFT's ``safe_serialization=True``, ``is_main_process`` (False writes nothing)
    and ``save_embedding_layers`` (False or "auto"; peftlab never trains embeddings in full).
    """
    unknown = sorted(set(kwargs) - _SAVE_OPTIONS)
    if unknown:
        raise TypeError(
            f"save_pretrained() got unsupported arguments {unknown}; supported: {sorted(_SAVE_OPTIONS)}"
        )
    if kwargs.get("safe_serialization", True) is not True:
        raise ValueError("safe_serialization=False: peftlab writes safetensors only (no pickle files)")
    if kwargs.get("save_embedding_layers", "auto") not in ("auto", False):
        raise ValueError("save_embedding_layers=True: peftlab adapters never change the embeddings")
    if not kwargs.get("is_main_process", True):
        return
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    if not names:
        raise ValueError("selected_adapters is empty; name at least one adapter (or pass None for all)")
    for name in names:
        model.require_adapter(name)
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; save_pretrained() needs a folder path")
    for name in names:
        save_adapter(model, name, adapter_dir(root, name))


def save_adapter(model: AdapterHost, adapter_name: str, folder: str | os.PathLike[str]) -> None:
    """Save one adapter as ``folder/adapter_config.json`` + ``folder/adapter_model.safetensors``."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if created:
        atomic.fsync_path(folder.parent)
    _finish_interrupted_save(folder)
    state = adapter_state_dict(model, adapter_name)
    config_raw = (
        json.dumps(config_to_peft_dict(model, adapter_name), indent=2, sort_keys=True) + "\n"
    ).encode()
    metadata = {"format": "pt", CONFIG_HASH_KEY: _sha256(config_raw)}
    staged: list[Path] = []
    try:
        staged.append(atomic.stage_file(folder / WEIGHTS_NAME, lambda p: _write_weights(p, state, metadata)))
        staged.append(atomic.stage_file(folder / CONFIG_NAME, lambda p: p.write_bytes(config_raw)))
        # the weights' rename is the commit point; they name the config they belong to
        atomic.commit(staged[0], folder / WEIGHTS_NAME)
        atomic.commit(staged[1], folder / CONFIG_NAME)
    except BaseException:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise


def _finish_interrupted_save(folder: Path) -> None:
    """Complete a save killed between its two renames, then drop stale temporary files."""
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        # a damaged or config-less old checkpoint is replaced by this save anyway
        with contextlib.suppress(CheckpointError):
            _config_bytes(folder, _read_metadata(weights))
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        atomic.remove_temps(folder, name)


# ---- loading ----------------------------------------------------------------------------
def _adapter_folder(model_id: str | os.PathLike[str], subfolder: str | None) -> Path:
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file; pass the folder that holds {CONFIG_NAME}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"adapter folder {folder} does not exist; peftlab loads adapters from local folders "
            "(download a Hub adapter first, e.g. `hf download ID --local-dir DIR`)"
        )
    return folder


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error type for every header problem
        raise CheckpointError(_corrupt_message(path, err)) from None


def _corrupt_message(path: Path, err: Exception) -> str:
    return (
        f"{path} is truncated or corrupt ({err}); it cannot be read. Re-save the adapter, or "
        "restore the file from where it came from"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:
        raise CheckpointError(_corrupt_message(path, err)) from None
    return tensors, meta


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} could not be read as a weights-only torch file ({type(err).__name__}: {err}); "
            "re-save the adapter as safetensors"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a mapping of names to tensors")
    return state


def _read_weights(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    safetensors_path = folder / WEIGHTS_NAME
    pickle_path = folder / PICKLE_WEIGHTS_NAME
    if safetensors_path.is_file():
        tensors, meta = _read_safetensors(safetensors_path)
        return safetensors_path, tensors, meta
    if pickle_path.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} holds its weights only as {PICKLE_WEIGHTS_NAME}, a pickle file, which can run "
                "code when loaded; peftlab does not load it by default. If you trust its source, pass "
                "allow_pickle=True (it is then read with torch.load(weights_only=True)), and re-save it "
                "with save_pretrained() to get safetensors"
            )
        return pickle_path, _read_pickle(pickle_path), {}
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(_missing_config_message(folder))
    raise CheckpointError(
        f"{folder} has no {WEIGHTS_NAME}; the adapter's weights are missing (an incomplete copy?): "
        "copy the file over or re-save the adapter"
    )


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"{path}: {key} contains NaN or inf; the adapter is damaged (e.g. training diverged): "
                "re-save it from a healthy run"
            )


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An adapter checkpoint read and validated, before any model is touched."""

    path: Path  # the weights file
    config: PeftConfig
    tensors: dict[str, torch.Tensor]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def does_not_fit(self, err: Exception) -> CheckpointError:
        """The error for a model this checkpoint's adapter cannot be added to."""
        base = getattr(self.config, "base_model_name_or_path", None)
        return CheckpointError(
            f"the {self.config.peft_type} adapter in {self.folder} does not fit this model: {err}. Load it "
            "into the base model it was trained on" + (f" ({base})" if base else "")
        )


LOAD_OPTIONS = frozenset({"config", "allow_pickle", "strict", "subfolder"})


def read_checkpoint(model_id: str | os.PathLike[str], **options: Any) -> Checkpoint:
    """Read the adapter saved in ``model_id`` and check it is whole: ``subfolder``, ``config``
    (use this config instead of the file's), ``allow_pickle`` (read a legacy
    ``adapter_model.bin`` with ``torch.load(weights_only=True)``); ``strict`` is accepted for
    :func:`fill_adapter`."""
    unknown = sorted(set(options) - LOAD_OPTIONS)
    if unknown:
        raise TypeError(f"unsupported arguments {unknown}; supported: {sorted(LOAD_OPTIONS)}")
    folder = _adapter_folder(model_id, options.get("subfolder"))
    path, tensors, meta = _read_weights(folder, bool(options.get("allow_pickle", False)))
    config = options.get("config")
    if config is None:
        config = parse_config(folder / CONFIG_NAME, _config_bytes(folder, meta))
    elif not isinstance(config, PeftConfig):
        raise TypeError(f"config must be a peftlab config (LoraConfig, ...), got {type(config).__name__}")
    _check_finite(path, tensors)
    return Checkpoint(path, config, tensors)


def fill_adapter(model: AdapterHost, adapter_name: str, checkpoint: Checkpoint, strict: bool = True) -> None:
    """Check the file against the adapter's table, then copy every tensor in (no partial load)."""
    path, tensors = checkpoint.path, checkpoint.tensors
    config = model.peft_config[adapter_name]
    entries = {e.peft_key: e for e in peft_key_table(model, adapter_name)}
    model_level: dict[str, torch.Tensor] = {}
    method = method_for(config)
    if adapter_name in model.model_adapters:
        model_level = dict(method.export_model_adapter(model.model_adapters[adapter_name]))
    base_name = getattr(config, "base_model_name_or_path", None)
    wanted = {k: tuple(e.param.shape) for k, e in entries.items()}
    wanted.update({k: tuple(v.shape) for k, v in model_level.items()})
    required = [k for k, e in entries.items() if e.required] + list(model_level)

    mismatched = [k for k, v in tensors.items() if k in wanted and tuple(v.shape) != wanted[k]]
    if mismatched:
        key = mismatched[0]
        where = f"module {entries[key].module}" if key in entries else "the model-level adapter"
        more = f" (and {len(mismatched) - 1} more weights)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{path}: {key} has shape {tuple(tensors[key].shape)} in the file but {where} needs "
            f"{wanted[key]}{more}: the adapter was made for a different base model"
            + (f" ({base_name})" if base_name else "")
            + " or with other settings than adapter_config.json says; load it into its own base model"
        )
    missing = [k for k in required if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in wanted)
    if strict and missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} of the adapter's weights ({_fmt_keys(missing)}); the file is "
            "incomplete or belongs to another config. Re-save the adapter, or pass strict=False to load "
            "what is there and keep the rest at their initial values"
        )
    if strict and unexpected:
        raise CheckpointError(
            f"{path} has {len(unexpected)} weights this adapter does not have on this model "
            f"({_fmt_keys(unexpected)}): adapter_config.json does not describe these weights, or the "
            "adapter is for another model. Fix the config, or pass strict=False to ignore them"
        )
    if missing or unexpected:
        warnings.warn(
            f"{path}: loaded with strict=False; missing {_fmt_keys(missing) or 'none'}, "
            f"ignored {_fmt_keys(unexpected) or 'none'}",
            stacklevel=3,
        )
    if model_level:
        try:
            method.import_model_adapter(
                model.model_adapters[adapter_name], {k: tensors[k] for k in model_level if k in tensors}
            )
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: the {config.peft_type} weights do not fit: {err}") from None
    with torch.no_grad():
        for key, entry in entries.items():
            if entry.required and key in tensors:
                entry.param.copy_(tensors[key].to(entry.param.dtype))


def load_adapter_weights(model: AdapterHost, checkpoint_dir: str | os.PathLike[str]) -> list[str]:
    """Copy the weights saved in ``checkpoint_dir`` (a ``save_pretrained`` folder) into the
    model's existing adapters of the same names, in place; returns the names loaded.

    Unlike ``load_adapter`` nothing is added or replaced: the parameter objects stay the same,
    which is what resuming an optimizer needs. Every adapter of the model must be in the folder
    ("default" at its top, others in sub-folders), with the same method and shapes.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist")
    names = list(model.peft_config)
    missing = [n for n in names if not (adapter_dir(root, n) / CONFIG_NAME).is_file()]
    if missing:
        raise CheckpointError(
            f"{root} holds no saved adapter for {missing} (looked for {CONFIG_NAME} in "
            f"{', '.join(str(adapter_dir(root, n)) for n in missing)}); resume from a checkpoint "
            "written by AdapterTrainer or save_pretrained() for a model with these adapters"
        )
    # read and check everything before the first copy, so a bad folder changes nothing
    loaded = []
    for name in names:
        checkpoint = read_checkpoint(adapter_dir(root, name))
        mine = model.peft_config[name]
        if checkpoint.config.peft_type != mine.peft_type:
            raise CheckpointError(
                f"{checkpoint.folder} holds a {checkpoint.config.peft_type} adapter but adapter {name!r} of "
                f"this model is {mine.peft_type}; resume into a model built with the same config"
            )
        loaded.append((name, checkpoint))
    for name, checkpoint in loaded:
        fill_adapter(model, name, checkpoint, strict=True)
    return names


def adapter_dir(root: Path, adapter_name: str) -> Path:
    """Where ``save_pretrained(root)`` puts an adapter: "default" in ``root``, others in sub-folders."""
    return root if adapter_name == DEFAULT_ADAPTER else root / adapter_name


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Checkpoint",
    "CheckpointError",
    "KeyEntry",
    "adapter_state_dict",
    "fill_adapter",
    "load_adapter_weights",
    "peft_key_table",
    "read_adapter_config",
    "read_checkpoint",
    "save_adapter",
    "save_pretrained",
]
