"""``peftlab train``'s settings: :class:`RunConfig` (the command's flags and a run file's keys
are its fields), reading JSON/YAML run files, and merging a run file with the command line.

A method starts from its preset (:mod:`peftlab.presets`); ``method_options`` override the
preset's fields. Everything is checked on construction, before any model loads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.config import PeftConfig, TaskType
from peftlab.core.quantized import check_scheme
from peftlab.devices import parse_device, parse_dtype
from peftlab.extras import require
from peftlab.presets import PRESETS
from peftlab.training.fitting import check_chat_template
from peftlab.training.memory import check_max_memory
from peftlab.training.tracking import check_report_to

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
    {
        "out", "save_every", "keep_checkpoints", "eval_every", "num_eval", "device", "report_to",
        "auto_batch", "max_memory",
    }
)  # fmt: skip
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
    # plan micro-batches (and checkpointing) to fit memory, and survive out-of-memory errors
    auto_batch: bool = False
    max_memory: float | None = None  # GiB the run may take (implies auto_batch); None: the device's

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every setting (and normalise device and dtype); one error names the problem."""
        if self.method not in PRESETS:
            raise ValueError(f"method: {self.method!r} is not one; choose from {', '.join(PRESETS)}")
        if not isinstance(self.method_options, dict):
            raise ValueError(
                f"method_options: expected a mapping of option names to values, got {self.method_options!r}"
            )
        self._check_sources()
        self._check_numbers()
        self._check_strings()
        self._check_checkpointing_and_quantization()
        self.device = parse_device(self.device)
        self.dtype = parse_dtype(self.dtype)
        check_chat_template(self.chat_template)
        check_report_to(self.report_to)
        self.peft_config()  # the method options are checked now, not after the model has loaded

    def _check_sources(self) -> None:
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

    def _check_numbers(self) -> None:
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
        if not isinstance(self.auto_batch, bool):
            raise ValueError(f"auto_batch: must be true or false, got {self.auto_batch!r}")
        check_max_memory(self.max_memory)
        if self.max_grad_norm is not None and (
            not _is_number(self.max_grad_norm) or not self.max_grad_norm > 0
        ):
            raise ValueError(
                f"max_grad_norm: must be a number > 0 or null (no clipping), got {self.max_grad_norm!r}"
            )

    def _check_strings(self) -> None:
        for name in (
            "model", "gguf_file", "task", "data", "eval_data", "out", "lr_schedule", "device", "dtype",
            "chat_template", "report_to", "quantize",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: must be a string, got {value!r}")

    def _check_checkpointing_and_quantization(self) -> None:
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                "gradient_checkpointing: must be true, false or null (auto), got "
                f"{self.gradient_checkpointing!r}"
            )
        method = PRESETS[self.method].method
        if (
            self.gradient_checkpointing
            and method is not None
            and not method.supports_activation_checkpointing
        ):
            raise ValueError(
                f"gradient_checkpointing: {method.checkpointing_refusal()}; drop --gradient-checkpointing"
            )
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant: must be true or false, got {self.double_quant!r}")
        if self.quantize is None:
            self.quantize = PRESETS[self.method].quantize
        if self.quantize is not None:
            check_scheme(self.quantize)
            if PRESETS[self.method].method is None:
                raise ValueError(
                    "--quantize: full fine-tuning updates every weight, and quantized weights cannot "
                    "train; pick an adapter method (--method lora) or drop --quantize"
                )

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else PRESETS[self.method].learning_rate

    def peft_config(self, model_config: Any = None) -> PeftConfig | None:
        """The method preset's adapter config for the model (whose transformers config sizes it,
        when known) with ``method_options`` on top; None for full fine-tuning."""
        options = dict(self.method_options)
        if model_config is None:  # checking the options before the model is known
            task_type = PRESETS[self.method].default_task_type
        elif getattr(model_config, "is_encoder_decoder", False):
            task_type = TaskType.SEQ_2_SEQ_LM
        else:
            task_type = TaskType.CAUSAL_LM
        preset = PRESETS[self.method].config(model_config, task_type)
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

    @property
    def plans_memory(self) -> bool:
        """Whether the run plans its micro-batches to fit memory (``--auto-batch`` or
        ``--max-memory``)."""
        return self.auto_batch or self.max_memory is not None

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


def uses_checkpointing(config: RunConfig) -> bool:
    """``gradient_checkpointing`` as set, or (None) on over a quantized base for every method
    that works with it."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    return config.quantize is not None and PRESETS[config.method].supports_activation_checkpointing
