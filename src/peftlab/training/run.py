"""``peftlab train`` as a library call: one method on one causal LM and one data set, with
progress, evaluation, atomic checkpoints, exact resume and data parallelism.

:class:`RunConfig` holds every setting (the command's flags and a run file's keys are its
fields); :func:`run_training` runs it. Under ``torchrun`` / ``accelerate launch`` each process
trains on its share of every global batch through ``DistributedDataParallel`` and only rank 0
writes files or shows progress. A checkpoint (see :mod:`peftlab.training.checkpoints`) holds the
trainable parameters, optimizer, scheduler, data position and every process's RNG state, so a
resumed run continues bit for bit. A method starts from its preset (:mod:`peftlab.presets`);
``method_options`` override the preset's fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab import allocator
from peftlab.core import atomic
from peftlab.core.config import PeftConfig, TaskType
from peftlab.core.peft_model import PeftModel, get_peft_model
from peftlab.core.quantized import check_scheme, enable_activation_checkpointing, prepare_for_kbit_training
from peftlab.count import activation_assumption
from peftlab.data.catalog import get_task
from peftlab.data.files import task_from_files
from peftlab.data.tasks import Example, Task
from peftlab.devices import Precision, parse_device, parse_dtype, peak_memory, resolve_dtype
from peftlab.extras import require
from peftlab.models import load_causal_lm, load_tokenizer, quiet
from peftlab.presets import PRESETS
from peftlab.training import distributed
from peftlab.training.checkpoints import (
    CHECKPOINT_DIR,
    TrainCheckpointError,
    latest_checkpoint,
    read_json,
    read_state,
    read_tensors,
    save_checkpoint,
    step_folders,
    write_json,
    write_state,
)
from peftlab.training.fitting import (
    FitReport,
    LengthPlan,
    PromptFormat,
    check_chat_template,
    check_lost,
    context_length,
    example_lengths,
    fit_examples,
    plan_lengths,
)
from peftlab.training.loop import (
    Encoded,
    TrainConfig,
    TrainHistory,
    TrainingDiverged,
    TrainLoop,
    evaluate_loss,
    evaluate_task,
    pad_id,
    rng_state,
)
from peftlab.training.tracking import Tracker, check_report_to, make_tracker

DEFAULT_EVAL_FRACTION = 0.1
# method options that also have their own flag (--r, --lora-alpha, ...) and top-level config key
METHOD_OPTION_KEYS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "reduction_factor",
    "bottleneck_size",
    "non_linearity",
    "num_virtual_tokens",
    "prefix_projection",
)
# settings a resumed run may change: none of them alters the training trajectory
RESUMABLE_CHANGES = frozenset(
    {"out", "save_every", "keep_checkpoints", "eval_every", "num_eval", "device", "report_to"}
)
# settings where giving one (on the command line) replaces the others (from a run file)
EXCLUSIVE_GROUPS = (("steps", "epochs"), ("task", "data"), ("eval_data", "eval_fraction"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RunConfig:
    """Every setting of a training run; a run file (JSON/YAML) holds the same keys."""

    model: str | None = None  # HF id, local folder or .gguf file; None = embedded SmolLM2-135M
    gguf_file: str | None = None
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)  # fields of the method's config
    task: str | None = None  # a built-in task ...
    data: str | None = None  # ... or a JSONL/CSV file
    eval_data: str | None = None
    eval_fraction: float | None = None  # of --data held out (default 0.1) when no eval_data
    steps: int | None = None  # optimizer steps, or ...
    epochs: float | None = None  # ... passes over the training data (default 1)
    batch_size: int = 8  # per process and forward pass
    grad_accum: int = 1
    lr: float | None = None  # default: the method preset's
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    # None: on over a quantized base (as QLoRA and HF PEFT's k-bit preparation do), else off
    gradient_checkpointing: bool | None = None
    quantize: str | None = None  # nf4 | fp4 | int8: the frozen base quantized (peftlab.core.quantized)
    double_quant: bool = False  # 4-bit block scales stored in 8 bits
    seed: int = 0
    max_length: int | None = None  # None: from the data (see peftlab.training.fitting)
    out: str = "peftlab-train"
    save_every: int = 100  # steps between checkpoints; 0 = only the final adapter
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    num_eval: int = 100  # held-out examples evaluated; 0 = no evaluation
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (peftlab.devices)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto: mixed precision (peftlab.devices)
    chat_template: str = "auto"  # auto | none | a .jinja file (peftlab.training.fitting)
    report_to: str = "none"  # none | tensorboard | mlflow | trackio (peftlab.training.tracking)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in PRESETS:
            raise ValueError(f"method: {self.method!r} is not one; choose from {', '.join(PRESETS)}")
        if not isinstance(self.method_options, dict):
            raise ValueError(
                f"method_options: expected a mapping of option names to values, got {self.method_options!r}"
            )
        if self.task is None and self.data is None:
            raise ValueError(
                "no training data: give --data FILE (JSONL/CSV) or --task NAME (a built-in task)"
            )
        if self.task is not None and self.data is not None:
            raise ValueError("give either --task or --data, not both")
        if self.eval_data is not None and self.data is None:
            raise ValueError("--eval-data needs --data (the training file); built-in tasks bring their own")
        if self.eval_fraction is not None:
            if self.data is None or self.eval_data is not None:
                raise ValueError("--eval-fraction applies only to --data without --eval-data; drop it")
            if not _is_number(self.eval_fraction) or not 0 < self.eval_fraction < 1:
                raise ValueError(f"eval_fraction: must be in (0, 1), got {self.eval_fraction!r}")
        if self.gguf_file is not None and self.model is None:
            raise ValueError("--gguf-file needs --model (the folder or hub id that holds the file)")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either --steps or --epochs, not both")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise ValueError(f"steps: must be an integer >= 1, got {self.steps!r}")
        if self.epochs is not None and (not _is_number(self.epochs) or not self.epochs > 0):
            raise ValueError(f"epochs: must be a number > 0, got {self.epochs!r}")
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 2):
            raise ValueError(
                f"max_length: must be an integer >= 2 or null (from the data), got {self.max_length!r}"
            )
        for name in ("warmup_steps", "save_every", "eval_every", "num_eval", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {getattr(self, name)!r}")
        if self.lr is not None and (not _is_number(self.lr) or not self.lr > 0):
            raise ValueError(f"lr: must be a number > 0, got {self.lr!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be a number >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (
            not _is_number(self.max_grad_norm) or not self.max_grad_norm > 0
        ):
            raise ValueError(
                f"max_grad_norm: must be a number > 0 or null (no clipping), got {self.max_grad_norm!r}"
            )
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                "gradient_checkpointing: must be true, false or null (auto), got "
                f"{self.gradient_checkpointing!r}"
            )
        if self.gradient_checkpointing and self.method in PRESETS and _is_prefix(self.method):
            raise ValueError(
                "gradient_checkpointing: prefix tuning does not work with it (the recomputed attention "
                "would run without the prefix); drop --gradient-checkpointing"
            )
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant: must be true or false, got {self.double_quant!r}")
        for name in (
            "model", "gguf_file", "task", "data", "eval_data", "out", "lr_schedule", "device", "dtype",
            "chat_template", "report_to", "quantize",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: must be a string, got {value!r}")
        self.device = parse_device(self.device)
        self.dtype = parse_dtype(self.dtype)
        check_chat_template(self.chat_template)
        check_report_to(self.report_to)
        if self.quantize is None:
            self.quantize = PRESETS[self.method].quantize if self.method in PRESETS else None
        if self.quantize is not None:
            check_scheme(self.quantize)
            if self.method == "full":
                raise ValueError(
                    "--quantize: full fine-tuning updates every weight, and quantized weights cannot "
                    "train; pick an adapter method (--method lora) or drop --quantize"
                )
        self.peft_config()  # the method options are checked now, not after the model has loaded

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else PRESETS[self.method].learning_rate

    def peft_config(self, model_config: Any = None) -> PeftConfig | None:
        """The method preset's adapter config for the model (whose transformers config sizes it,
        when known) with ``method_options`` on top; None for full fine-tuning."""
        options = dict(self.method_options)
        preset = PRESETS[self.method].config(model_config, TaskType.CAUSAL_LM)
        if preset is None:
            if options:
                raise ValueError(
                    f"--method {self.method} trains every weight and takes no method options; got "
                    + ", ".join(sorted(options))
                )
            return None
        cls = type(preset)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(
                f"--method {self.method} has no option {', '.join(map(repr, unknown))}; its options are "
                f"{', '.join(sorted(fields))}"
            )
        values = {k: v for k, v in preset.to_dict().items() if k != "peft_type"}
        try:
            return cls(**{**values, **options})
        except TypeError as err:
            raise ValueError(f"--method {self.method}: {err}") from None
        except ValueError as err:
            raise ValueError(f"--method {self.method} option {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "run config") -> RunConfig:
        _check_keys(data, source)
        return cls(**data)


def _normalize_key(key: Any, source: str) -> str:
    if not isinstance(key, str):
        raise ValueError(f"{source}: keys must be strings, got {key!r}")
    return key.replace("-", "_")


def normalize_settings(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys with ``-`` spelled ``_`` and method option shortcuts (``r``, ...) moved into
    ``method_options``; an option given both ways is an error."""
    out: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        name = _normalize_key(key, source)
        if name in out or (name in METHOD_OPTION_KEYS and name in options):
            raise ValueError(f"{source}: key {name!r} is given twice")
        if name == "method_options":
            if not isinstance(value, dict):
                raise ValueError(f"{source}: method_options must be a mapping, got {value!r}")
            for k, v in value.items():
                option = _normalize_key(k, source)
                if option in options:
                    raise ValueError(f"{source}: method option {option!r} is given twice")
                options[option] = v
        elif name in METHOD_OPTION_KEYS:
            options[name] = value
        else:
            out[name] = value
    if options:
        out["method_options"] = options
    return out


def read_run_file(path: str | Path) -> dict[str, Any]:
    """The settings in a ``.json`` or ``.yaml``/``.yml`` run file (YAML needs PyYAML)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{p}: unknown run config format {suffix!r}; use .json, .yaml or .yml")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such run config file") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from None
    else:
        yaml = require("yaml", f"reading the YAML run file {p} (or use a .json file)")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{p}: not valid YAML ({err})") from None
        if isinstance(data, dict):
            data = {k: _yaml_float(v) for k, v in data.items()}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: must hold a mapping of settings, got {type(data).__name__}")
    settings = normalize_settings(data, str(p))
    _check_keys(settings, str(p))
    return settings


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml_float(value: Any) -> Any:
    """PyYAML follows YAML 1.1, where ``2e-4`` (no dot) is a string; read it as YAML 1.2 does."""
    if isinstance(value, dict):
        return {k: _yaml_float(v) for k, v in value.items()}
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    return value


def _check_keys(settings: dict[str, Any], source: str) -> None:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(
            f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known keys are {', '.join(sorted(names | set(METHOD_OPTION_KEYS)))}"
        )


def merge_settings(from_file: dict[str, Any], from_cli: dict[str, Any]) -> dict[str, Any]:
    """Command-line settings over the run file's; method options merge key by key, and a flag
    of an exclusive group (``--steps`` vs ``epochs``) replaces the file's other member."""
    merged = dict(from_file)
    for group in EXCLUSIVE_GROUPS:
        if any(k in from_cli for k in group):
            for k in group:
                merged.pop(k, None)
    for key, value in from_cli.items():
        if key == "method_options":
            merged["method_options"] = {**merged.get("method_options", {}), **value}
        else:
            merged[key] = value
    return merged


# ---- the run --------------------------------------------------------------------------


@dataclass
class RunResult:
    model: nn.Module
    tokenizer: Any
    metrics: dict[str, Any]
    out: Path


def load_run_task(config: RunConfig) -> Task:
    if config.data is not None:
        fraction = DEFAULT_EVAL_FRACTION if config.eval_fraction is None else config.eval_fraction
        return task_from_files(
            config.data, eval_path=config.eval_data, eval_fraction=fraction, seed=config.seed
        )
    assert config.task is not None
    return get_task(config.task, seed=config.seed)


def total_steps(config: RunConfig, num_train: int, global_batch: int) -> int:
    if config.steps is not None:
        return config.steps
    epochs = 1.0 if config.epochs is None else float(config.epochs)
    return max(1, math.ceil(epochs * num_train / global_batch))


def quantized_load(scheme: str | None, double_quant: bool, device: Any) -> dict[str, Any]:
    """The loader's arguments for a quantized base (loaded straight onto its device), or none."""
    if scheme is None:
        return {}
    return {"quantization": scheme, "double_quant": double_quant, "device": device}


def uses_checkpointing(config: RunConfig) -> bool:
    """``gradient_checkpointing`` as set, or (None) on over a quantized base for every method
    that allows it (prefix tuning does not)."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    return config.quantize is not None and not _is_prefix(config.method)


def _is_prefix(method: str) -> bool:
    return str(PRESETS[method].peft_type) == "PREFIX_TUNING"


def _build_model(config: RunConfig, base: nn.Module) -> nn.Module:
    supported = getattr(base, "supports_gradient_checkpointing", False)
    if uses_checkpointing(config) and (supported or config.gradient_checkpointing):
        if not supported:
            raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; drop the flag")
        # non-reentrant: works with frozen inputs (adapters) and under DDP
        enable_activation_checkpointing(base)
        model_config = getattr(base, "config", None)
        if model_config is not None:
            model_config.use_cache = False
    peft_config = config.peft_config(getattr(base, "config", None))
    if peft_config is None:
        base.requires_grad_(True)
        return base
    # adapter initialisation draws from torch's global RNG: seed it, and leave it as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_peft_model(base, peft_config)


def data_fingerprint(data: list[Encoded]) -> str:
    """SHA-256 of the encoded training examples: a resumed run must see the same data."""
    digest = hashlib.sha256()
    for ex in data:
        digest.update(json.dumps([ex.input_ids, ex.labels], separators=(",", ":")).encode())
    return digest.hexdigest()


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
    # a run saved before a setting existed ran with that setting's default
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    saved = {k: saved.get(k, defaults.get(k)) for k in keys}
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _load_checkpoint(
    folder: Path, model: nn.Module, config: RunConfig, world_size: int, fingerprint: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the checkpoint against this run, copy the trainable parameters in, and return
    (trainer state, optimizer state)."""
    saved = read_json(folder / "run_config.json")
    if not isinstance(saved, dict):
        raise TrainCheckpointError(f"{folder}/run_config.json is not a mapping; the checkpoint is damaged")
    diffs = _differences(saved, config.to_dict())
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
    tensors = read_tensors(folder / "trainable.safetensors")
    params = _trainable(model)
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
    return trainer, read_state(folder, "optimizer")


def _write_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    loop: TrainLoop,
    config: RunConfig,
    rng: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    fingerprint: str,
) -> None:
    from safetensors.torch import save_file

    params = {n: p.detach().to("cpu").contiguous().clone() for n, p in _trainable(model).items()}
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
    write_json(folder / "run_config.json", config.to_dict())


def _evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    evals: Split,
    config: RunConfig,
    plan: LengthPlan,
    *,
    precision: Precision | None = None,
    fmt: PromptFormat | None = None,
) -> dict[str, float]:
    """Eval loss and the task metric on the first ``num_eval`` held-out examples (as fitted;
    generation continues each one's prompt, chat-rendered when ``fmt`` has a template)."""
    n = min(config.num_eval, len(evals.examples))
    device = next(model.parameters()).device
    # evaluation must not move the training RNG, or a resumed run would differ
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loss = evaluate_loss(model, evals.encoded[:n], pad_token_id=pad_id(tokenizer), precision=precision)
        result = {"eval_loss": loss}
        scored = evaluate_task(
            model,
            tokenizer,
            dataclasses.replace(task, eval=tuple(evals.examples[:n])),
            batch_size=16,
            prompt_ids=[e.prompt_ids for e in evals.encoded[:n]],
            max_new_tokens=plan.max_new_tokens,
            stop_ids=fmt.stop_ids() if fmt is not None else (),
            precision=precision,
        )
        result.update(scored.metrics)
    return result


@dataclass
class Split:
    examples: list[Example]
    encoded: list[Encoded]
    fit: FitReport


# the activation memory one batch may take at the chosen length (what caps lengths from the data)
MEMORY_BUDGET_BYTES = 4 * 2**30


def plan_run_lengths(
    config: RunConfig,
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    batch_size: int,
    fmt: PromptFormat | None = None,
    param_bytes: int = 4,
) -> LengthPlan:
    acts = activation_assumption(getattr(model, "config", None), model, 1, 1)
    return plan_lengths(
        example_lengths(tokenizer, task.train, fmt),
        requested=config.max_length,
        context=context_length(model),
        bytes_per_token=acts.bytes(param_bytes),
        batch_size=batch_size,
        budget_bytes=MEMORY_BUDGET_BYTES,
    )


def fit_split(
    tokenizer: Any, examples: Sequence[Example], plan: LengthPlan, part: str, fmt: PromptFormat | None = None
) -> Split:
    kept, encoded, report = fit_examples(tokenizer, examples, plan.max_length, part=part, fmt=fmt)
    check_lost(report, plan)
    return Split(kept, encoded, report)


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_training(
    config: RunConfig, *, resume: bool = False, verbose: bool = False, command: str = ""
) -> RunResult:
    """Train as ``config`` says and write the adapter (or full model) and metrics to ``config.out``."""
    info = distributed.setup(config.device)
    try:
        # a dtype the device cannot run is refused here, before any weights are loaded
        precision = Precision(info.device, resolve_dtype(config.dtype, info.device))
        # the default learning rate is written out, so a checkpoint does not depend on the preset
        run = _Run(
            dataclasses.replace(config, lr=config.learning_rate), info, precision=precision, verbose=verbose
        )
        return run.execute(resume=resume, command=command)
    finally:
        distributed.teardown(info)


class _Run:
    """One ``peftlab train`` run, step by step: output folder, model and data, the loop (resumed
    from a checkpoint when asked), periodic evaluation and checkpoints, the final files."""

    def __init__(
        self, config: RunConfig, info: distributed.Dist, *, precision: Precision, verbose: bool
    ) -> None:
        self.config = config
        self.info = info
        self.precision = precision
        self.tracker: Tracker = Tracker()
        self.peak_bytes: int | None = None  # torch.cuda.max_memory_allocated over training
        self.verbose = verbose
        self.out = Path(config.out)
        self.root = self.out / CHECKPOINT_DIR
        self.evals: list[dict[str, Any]] = []

    def say(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message)

    def execute(self, *, resume: bool, command: str) -> RunResult:
        checkpoint = self._checkpoint_to_resume(resume)
        self.task = load_run_task(self.config)
        wall = time.perf_counter()
        # a chat template asked for and missing is refused before the weights load
        PromptFormat.resolve(
            load_tokenizer(self.config.model, gguf_file=self.config.gguf_file, verbose=self.verbose),
            self.config.chat_template,
            chat_rows=self.task.info.get("kind") == "chat",
        )
        with quiet(self.verbose):
            self._load()
            loop = self._make_loop(checkpoint)
            self._banner(loop, resume, checkpoint)
            if self.info.is_main:
                self.tracker = make_tracker(
                    self.config.report_to, self.out, run_name=self.out.name or "peftlab-train"
                )
            try:
                self.tracker.log_config({**self.config.to_dict(), "precision": self.precision.to_dict()})
                with peak_memory(self.info.device) as peak:
                    history = self._train(loop)
                self.peak_bytes = peak["peak_bytes"]
                final = self._final_eval()
                metrics = self._metrics(loop, history, final, command, time.perf_counter() - wall)
                if self.info.is_main:
                    self._write_outputs(history, final, metrics)
            finally:
                self.tracker.close()
            distributed.barrier(self.info)
        return RunResult(self.model, self.tokenizer, metrics, self.out)

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; give a folder")
        # every process decides from the same files before any of them writes
        if not resume and (step_folders(self.root) or (self.out / "run_config.json").is_file()):
            raise ValueError(
                f"{self.out} already holds a training run; pass --resume to continue it, or choose "
                "another --out"
            )
        return latest_checkpoint(self.root) if resume else None

    def _load(self) -> None:
        config, info = self.config, self.info
        # rank 0 loads first: the embedded model is converted into a shared cache on first use
        if not info.is_main:
            distributed.barrier(info)
        # full fine-tuning keeps fp32 master weights; adapters train over a base in --dtype
        base, self.tokenizer = load_causal_lm(
            config.model,
            gguf_file=config.gguf_file,
            dtype=self.precision.load_dtype(trains_everything=config.peft_config() is None),
            verbose=self.verbose,
            **quantized_load(config.quantize, config.double_quant, self.precision.device),
        )
        if info.is_main:
            distributed.barrier(info)
        self.model = self.precision.prepare(_build_model(config, base))
        if config.quantize is not None:
            # after prepare, which casts frozen weights to --dtype: norms back to fp32, input grads
            prepare_for_kbit_training(self.model, gradient_checkpointing=False)
        self.pad = pad_id(self.tokenizer)
        self.fmt = PromptFormat.resolve(
            self.tokenizer, config.chat_template, chat_rows=self.task.info.get("kind") == "chat"
        )
        self.plan = plan_run_lengths(
            config,
            self.model,
            self.tokenizer,
            self.task,
            config.batch_size,
            self.fmt,
            param_bytes=self.precision.dtype.itemsize,
        )
        # the chosen length is written into the run's settings, so a resumed run checks it
        self.config = config = dataclasses.replace(config, max_length=self.plan.max_length)
        self.train_split = fit_split(self.tokenizer, self.task.train, self.plan, "train", self.fmt)
        self.eval_split = fit_split(self.tokenizer, self.task.eval, self.plan, "eval", self.fmt)
        self.train_data, self.eval_data = self.train_split.encoded, self.eval_split.encoded
        self.fingerprint = data_fingerprint(self.train_data)
        self.global_batch = config.batch_size * config.grad_accum * info.world_size
        self.steps = total_steps(config, len(self.train_data), self.global_batch)

    def _make_loop(self, checkpoint: Path | None) -> TrainLoop:
        config, info = self.config, self.info
        train_config = TrainConfig(
            steps=self.steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            max_length=self.plan.max_length,
            seed=config.seed,
            grad_accum=config.grad_accum,
            lr_schedule=config.lr_schedule,
        )
        saved: tuple[dict[str, Any], dict[str, Any]] | None = None
        if checkpoint is not None:
            saved = _load_checkpoint(checkpoint, self.model, config, info.world_size, self.fingerprint)
        forward_module: nn.Module = self.model
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            forward_module = DistributedDataParallel(
                self.model,
                device_ids=[info.device.index] if info.device.type == "cuda" else None,
                broadcast_buffers=False,  # buffers (rotary tables) are the same everywhere and never trained
            )
        loop = TrainLoop(
            self.model,
            self.train_data,
            train_config,
            pad_token_id=self.pad,
            forward_module=forward_module,
            rank=info.rank,
            world_size=info.world_size,
            precision=self.precision,
        )
        if saved is not None:
            trainer_state, optimizer_state = saved
            loop.load_state_dict({**trainer_state, "optimizer": optimizer_state})
            loop.resume_rng = trainer_state["rng"][info.rank]
            self.evals = list(trainer_state["evals"])
        return loop

    def _banner(self, loop: TrainLoop, resume: bool, checkpoint: Path | None) -> None:
        config = self.config
        self.trainable = sum(p.numel() for p in _trainable(self.model).values())
        self.total = sum(p.numel() for p in self.model.parameters())
        self.say(
            f"peftlab train: {config.method} on {config.model or 'smollm2-135m'}, task {self.task.name!r} "
            f"({len(self.train_data)} train / {len(self.eval_data)} eval examples)\n"
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {100 * self.trainable / self.total:.4f}\n"
            f"{self.steps} steps of {self.global_batch} examples (batch {config.batch_size} x grad_accum "
            f"{config.grad_accum} x {self.info.world_size} processes), lr {config.learning_rate:g} "
            f"({config.lr_schedule}); {self.precision.describe()}\n"
            f"{self.fmt.describe()}; {self.plan.describe()}; {self.train_split.fit.describe()}; "
            f"{self.eval_split.fit.describe()}"
        )
        if resume and checkpoint is None:
            self.say(f"--resume: no checkpoint in {self.root}; starting from step 0")
        elif checkpoint is not None:
            self.say(
                f"resuming from {checkpoint} (step {loop.step} of {self.steps}, "
                f"epoch {loop.batches.epoch:.2f})"
            )

    def _evaluate_now(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.info.is_main:
            metrics = _evaluate(
                self.model,
                self.tokenizer,
                self.task,
                self.eval_split,
                self.config,
                self.plan,
                precision=self.precision,
                fmt=self.fmt,
            )
            self.evals.append({"step": step, **metrics})
            self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        distributed.barrier(self.info)
        return metrics

    def _on_step(self, loop: TrainLoop) -> None:
        config, step = self.config, loop.step
        history = loop.history
        seconds = history.step_times[-1]
        self.tracker.log(
            {
                "train/loss": history.losses[-1],
                "train/learning_rate": history.learning_rates[-1],
                "train/tokens_per_second": history.tokens[-1] / seconds if seconds > 0 else 0.0,
            },
            step,
        )
        if config.eval_every and step % config.eval_every == 0 and step < self.steps and config.num_eval:
            metrics = self._evaluate_now(step)
            self.say(f"step {step}: {_fmt(metrics)}")
        if config.save_every and step % config.save_every == 0:
            rng = distributed.gather_to_main(self.info, rng_state())
            if self.info.is_main:
                save_checkpoint(
                    self.root,
                    step,
                    lambda folder: _write_checkpoint(
                        folder,
                        model=self.model,
                        loop=loop,
                        config=config,
                        rng=rng,
                        evals=self.evals,
                        fingerprint=self.fingerprint,
                    ),
                    config.keep_checkpoints,
                )
            distributed.barrier(self.info)

    def _train(self, loop: TrainLoop) -> TrainHistory:
        try:
            return loop.run(
                progress=self.info.is_main, desc=f"train {self.config.method}", on_step=self._on_step
            )
        except TrainingDiverged as err:
            last = latest_checkpoint(self.root)
            kept = (
                f"the last good checkpoint is {last}"
                if last
                else "no checkpoint was written yet (--save-every)"
            )
            raise RuntimeError(
                f"{err} (--lr is {self.config.learning_rate:g}); training stopped and {kept}"
            ) from None

    def _final_eval(self) -> dict[str, float]:
        return self._evaluate_now(self.steps) if self.config.num_eval else {}

    def _metrics(
        self, loop: TrainLoop, history: TrainHistory, final: dict[str, float], command: str, wall: float
    ) -> dict[str, Any]:
        task = self.task
        return {
            "command": command,
            "config": self.config.to_dict(),
            "task": {"name": task.name, "description": task.description, "metric": task.metric},
            "steps": self.steps,
            "precision": self.precision.to_dict(),
            "chat_template": self.fmt.source if self.fmt.chat else None,
            "peak_gpu_memory_bytes": self.peak_bytes,
            "allocator": allocator.loaded() or "system",
            "world_size": self.info.world_size,
            "global_batch_size": self.global_batch,
            "epochs": loop.batches.epoch,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "lengths": self.plan.to_dict(),
            "rows": {s.fit.part: s.fit.to_dict() for s in (self.train_split, self.eval_split)},
            "history": history.to_dict(),
            "evals": self.evals,
            "final_eval": final,
            "wall_seconds": wall,
        }

    def _write_outputs(self, history: TrainHistory, final: dict[str, float], metrics: dict[str, Any]) -> None:
        out, model = self.out, self.model
        out.mkdir(parents=True, exist_ok=True)
        # an adapter in PEFT's format, or (full) transformers' config.json + model.safetensors
        model.save_pretrained(out)  # type: ignore[operator]
        if not isinstance(model, PeftModel):
            self.tokenizer.save_pretrained(out)
        atomic.write_json(out / "run_config.json", self.config.to_dict())
        atomic.write_json(out / "metrics.json", metrics)
        what = "adapter (PEFT format)" if isinstance(model, PeftModel) else "model (safetensors)"
        self.say(
            f"loss {history.losses[0]:.4f} -> {history.losses[-1]:.4f}, "
            f"{history.tokens_per_second:.0f} tokens/s"
            + (f"; final eval: {_fmt(final)}" if final else "")
            + f"\nsaved the {what} to {out}"
        )
