"""Exact parameter counts and training-memory estimates per method, with no weights loaded.

The model is built from its ``config.json`` on the meta device (shapes, no storage), and each
method is applied through the real :func:`~peftlab.get_peft_model`, so the counts are exact
by construction and a 70B config takes seconds. The rows are the method presets of
:mod:`peftlab.presets` (or any other :class:`~peftlab.presets.MethodPreset` list).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.core import quantized
from peftlab.core.config import TaskType
from peftlab.core.peft_model import count_parameters, get_peft_model
from peftlab.core.registry import method_for
from peftlab.models import AUTO_CLASSES, kind_of_config
from peftlab.presets import PRESETS, MethodPreset
from peftlab.training.memory import (
    ACTIVATION_FORMULA,
    ADAMW_STATE_BYTES,
    GIB,
    PRECISIONS,
    TRAINED_BYTES,
    ActivationAssumption,
    MemoryEstimate,
    activation_assumption,
    build_meta_model,
    memory_estimates,
    quantizable_params,
    quantized_estimate,
)

# transformers config.json files of well-known models, for --preset
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

# the rows count shows (a quantized variant is estimated with --quantize instead)
UNQUANTIZED_PRESETS = tuple(preset for preset in PRESETS.values() if preset.quantize is None)


# ---- configs and presets ---------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    path = MODEL_CONFIG_DIR / f"{name}.json"
    if name not in preset_names():
        raise ValueError(
            f"unknown preset {name!r}; presets are: {', '.join(preset_names())} "
            "(or pass --config path/to/config.json)"
        )
    return load_config_file(path)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A transformers ``config.json`` as a dict, with errors that name the file and the problem."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist; pass a model's config.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"config file {str(p)!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {str(p)!r} is not UTF-8 text; pass a model's config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} holds a JSON {type(data).__name__}, not an object")
    return data


def model_config(data: dict[str, Any]) -> Any:
    """A transformers ``PretrainedConfig`` from a config dict (``model_type`` picks the class)."""
    import transformers
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(
            'config has no \'model_type\' (e.g. "llama", "t5"); add the one from the model\'s config.json'
        )
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError):
        raise ValueError(
            f"config: model_type {model_type!r} is not known to transformers {transformers.__version__}"
        ) from None
    except TypeError as err:
        raise ValueError(f"config: bad value for a {model_type} config field: {err}") from None


def _task_of_class(name: str, is_encoder_decoder: bool) -> TaskType | None:
    if name.endswith("ForCausalLM"):
        return TaskType.CAUSAL_LM
    if name.endswith(("ForSeq2SeqLM", "ForConditionalGeneration")) and is_encoder_decoder:
        return TaskType.SEQ_2_SEQ_LM
    if name.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS
    if name.endswith("ForTokenClassification"):
        return TaskType.TOKEN_CLS
    if name.endswith("Model"):
        return TaskType.FEATURE_EXTRACTION
    return None  # e.g. masked LM: no PEFT task type


def model_class(config: Any, task: TaskType | None = None) -> tuple[Any, TaskType | None]:
    """(transformers model class, task type) for ``config``.

    An explicit ``task`` picks the matching Auto class; otherwise the config's first
    ``architectures`` entry is used when transformers has it; otherwise a causal LM, a
    seq2seq LM or the bare model, whichever the architecture supports.
    """
    import transformers

    is_enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    if task is not None:
        return getattr(transformers, AUTO_CLASSES[task]), task
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls, _task_of_class(name, is_enc_dec)
    order = [TaskType.SEQ_2_SEQ_LM, TaskType.CAUSAL_LM] if is_enc_dec else [TaskType.CAUSAL_LM]
    for fallback in [*order, TaskType.FEATURE_EXTRACTION]:
        auto = getattr(transformers, AUTO_CLASSES[fallback])
        if type(config) in auto._model_mapping:
            return auto, fallback
    raise ValueError(f"transformers has no model class for model_type {config.model_type!r}")


# ---- the report ------------------------------------------------------------------------
@dataclass
class CountRow:
    label: str
    peft_type: str | None  # None for full fine-tuning
    trainable: int = 0
    total: int = 0
    targets: list[str] = field(default_factory=list)  # suffixes of the modules the adapter acts on
    adapted_modules: int = 0
    memory: dict[str, MemoryEstimate] = field(default_factory=dict)
    error: str | None = None  # why this method does not apply to this model

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def trainable_line(self) -> str:
        """HF PEFT's ``print_trainable_parameters`` line for this row."""
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.label,
            "peft_type": self.peft_type,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_percent": self.trainable_percent,
            "adapted_modules": self.adapted_modules,
            "targets": self.targets,
            "memory_bytes": {k: v.to_dict() for k, v in self.memory.items()},
            "error": self.error,
        }


@dataclass
class CountReport:
    model: str
    model_type: str
    model_kind: str  # "causal", "seq2seq" or "encoder", as the applications see it (peftlab.models)
    model_class: str
    task_type: TaskType | None
    activations: ActivationAssumption
    rows: list[CountRow]
    seconds: float
    quantized_bits: float | None = None  # bits per quantized weight, with --quantize

    def to_dict(self) -> dict[str, Any]:
        a = self.activations
        return {
            "model": self.model,
            "model_type": self.model_type,
            "model_kind": self.model_kind,
            "model_class": self.model_class,
            "task_type": self.task_type.value if self.task_type else None,
            "seconds": round(self.seconds, 3),
            "assumptions": {
                "batch_size": a.batch_size,
                "seq_len": a.seq_len,
                "num_layers": a.num_layers,
                "hidden_size": a.hidden_size,
                "output_size": a.output_size,
                "activation_formula": ACTIVATION_FORMULA,
                "bytes_per_frozen_param": PRECISIONS,
                "bytes_per_trained_param": TRAINED_BYTES,
                "adamw_state_bytes_per_trainable_param": ADAMW_STATE_BYTES,
                "bits_per_quantized_param": self.quantized_bits,
            },
            "rows": [r.to_dict() for r in self.rows],
        }

    def render(self) -> str:
        ok = [r for r in self.rows if r.error is None]
        task = f", task {self.task_type.value}" if self.task_type else ""
        lines = [
            f"peftlab count: {self.model} ({self.model_class}, model_type {self.model_type}, "
            f"a {self.model_kind} model{task}); "
            f"built on the meta device, no weights loaded ({self.seconds:.1f} s)",
            "",
            "## Parameters (exact)",
            "",
            *_table(
                ["method", "trainable params", "total params", "trainable %", "adapted modules"],
                [
                    [
                        r.label,
                        f"{r.trainable:,d}",
                        f"{r.total:,d}",
                        f"{r.trainable_percent:.4f}",
                        str(r.adapted_modules) if r.peft_type else "-",
                    ]
                    for r in ok
                ],
            ),
        ]
        targets = [r for r in ok if r.targets]
        if targets:
            lines += ["", "targets:"] + [f"- {r.label}: {', '.join(r.targets)}" for r in targets]
        for precision in dict.fromkeys(k for r in ok for k in r.memory):
            title = precision
            if precision not in PRECISIONS:
                title = f"adapters over the quantized base, {precision} (bf16 compute)"
            lines += [
                "",
                f"## Training memory estimate, {title} (GiB)",
                "",
                *_table(
                    ["method", "weights", "gradients", "AdamW states", "activations", "total"],
                    [
                        [r.label, *(f"{v / GIB:.2f}" for v in r.memory[precision].to_dict().values())]
                        for r in ok
                        if precision in r.memory
                    ],
                ),
            ]
        a = self.activations
        lines += [
            "",
            "Assumptions: weights for every parameter; gradients for trainable parameters only; bf16 "
            "(or fp16) is mixed precision as peftlab trains it: frozen weights in bf16, trained "
            "weights (full fine-tuning: fp32 master weights) and their gradients in fp32; AdamW keeps "
            "2 fp32 states per trainable parameter.",
            f"Activations: batch b={a.batch_size}, seq len s={a.seq_len}, L={a.num_layers} layers, "
            f"hidden h={a.hidden_size}, output V={a.output_size}: {ACTIVATION_FORMULA}.",
        ]
        if self.quantized_bits is not None:
            lines.append(
                f"Quantized base: every linear layer but the output head at {self.quantized_bits:.3g} "
                "bits per weight incl. block scales (NF4/FP4: 4-bit codes + an fp32 absmax per 64 weights; "
                "double quantisation: 8-bit absmax; int8: 8 bits); embeddings, norms and the head in "
                "bf16; full fine-tuning cannot train quantized weights, so it has no row."
            )
        failed = [r for r in self.rows if r.error is not None]
        if failed:
            lines += ["", "Not applicable to this model:"] + [f"- {r.label}: {r.error}" for r in failed]
        return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table padded to column width: readable in a terminal, pasteable in docs."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        out = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *(line(r) for r in rows)]


def _targets(model: Any, adapter_name: str) -> tuple[list[str], int]:
    """(distinct module-name suffixes, number of modules) where the adapter acts: the wrapped
    modules, or for prefix tuning the attention layers it enters."""
    names = method_for(model.peft_config[adapter_name]).adapted_modules(model, adapter_name)
    return sorted({n.rsplit(".", 1)[-1] for n in names}), len(names)


def count_methods(
    data: dict[str, Any],
    *,
    label: str = "model",
    rows: Sequence[MethodPreset] = UNQUANTIZED_PRESETS,
    batch_size: int = 1,
    seq_len: int = 512,
    task: TaskType | None = None,
    quantize: str | None = None,
    double_quant: bool = False,
) -> CountReport:
    """Exact counts and memory estimates of every row's method on the model ``data`` describes;
    with ``quantize`` (``"nf4"``, ``"fp4"``, ``"int8"``) also for adapters over that quantized
    base (:data:`peftlab.core.quantized.BITS_PER_PARAM` bits per weight)."""
    bits = None
    if quantize is not None:
        bits = quantized.BITS_PER_PARAM[(quantized.check_scheme(quantize), double_quant)]
        quant_label = quantize + ("+dq" if double_quant and quantize != "int8" else "")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch size and sequence length must be >= 1, got {batch_size} and {seq_len}")
    start = time.perf_counter()
    config = model_config(data)
    cls, task_type = model_class(config, task)
    base = build_meta_model(config, cls)
    acts = activation_assumption(config, base, batch_size, seq_len)
    linear_params = quantizable_params(base)
    kind = kind_of_config(str(config.model_type), bool(getattr(config, "is_encoder_decoder", False)))
    out: list[CountRow] = []
    for row in rows:
        if not row.applies_to(kind):
            continue  # e.g. prefix-all, for encoder-decoders only
        # a model without a PEFT task (e.g. masked LM) is counted as a language model
        peft_config = row.config(config, task_type or TaskType.CAUSAL_LM)
        result = CountRow(row.label, peft_config.peft_type if peft_config else None)
        if peft_config is None:
            result.trainable, result.total = count_parameters(base)
        else:
            # a fresh model per method: get_peft_model adapts its argument in place
            try:
                model = get_peft_model(build_meta_model(config, cls), peft_config)
            except ValueError as err:
                result.error = str(err)
                out.append(result)
                continue
            result.trainable, result.total = count_parameters(model)
            result.targets, result.adapted_modules = _targets(model, "default")
        result.memory = memory_estimates(result.trainable, result.total, acts)
        if bits is not None and peft_config is not None:
            result.memory[quant_label] = quantized_estimate(
                result.trainable, result.total, linear_params, bits, acts
            )
        out.append(result)
    return CountReport(
        model=label,
        model_type=str(config.model_type),
        model_kind=kind,
        model_class=type(base).__name__,
        task_type=task_type,
        activations=acts,
        rows=out,
        seconds=time.perf_counter() - start,
        quantized_bits=bits,
    )
