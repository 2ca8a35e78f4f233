"""The lesson's settings for each method, as every application uses them: one table.

``peftlab compare`` runs these rows, ``peftlab train --method NAME`` starts from a row's config
(the flags override it) and its learning rate, ``peftlab count`` counts the rows, ``peftlab
recommend`` prints a row's settings and ``peftlab demo`` trains two of them.

Where the lesson's figure does not scale down it is adapted, and said so here:

- bottleneck adapters: the lesson's reduction factor 64 (d_model 4096 -> a bottleneck of 64),
  lowered on small models to keep the bottleneck at least 16 wide (``hidden_size / 16``), since
  576 / 64 = 9 dimensions (SmolLM2-135M) is too narrow to learn in;
- prefix tuning: 20 virtual tokens through the reparametrisation MLP (the lesson, Li & Liang)
  for language models; for an encoder with a new classification head the vectors are trained
  directly (P-tuning v2's choice: through the MLP, MiniLM stayed at the majority class). On an
  encoder-decoder ``prefix`` is HF PEFT's layout (decoder self-attention only) and
  ``prefix-all`` the prefix-tuning paper's BART setting (encoder self-attention, decoder
  self-attention and cross-attention, each with prefixes of its own; PEFT cannot load it).

Learning rates: adapters that start at identity and have few parameters need large steps;
updating every weight needs small ones. Encoders train a new head alongside the adapter, hence
their own column (tuned on rotten-tomatoes with MiniLM, 150 steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftlab.core.config import PeftConfig, TaskType
from peftlab.core.method import Method
from peftlab.core.registry import method_for
from peftlab.methods.bottleneck import BottleneckConfig
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.lora import LoraConfig
from peftlab.methods.prefix import PrefixTuningConfig

# (the model's transformers config or None, the task type) -> the adapter config; None: full fine-tuning
ConfigFactory = Callable[[Any, TaskType], PeftConfig | None]
BOTTLENECK_REDUCTION = 64
MIN_BOTTLENECK = 16


@dataclass(frozen=True)
class MethodPreset:
    """One method as the applications run it. What the method itself knows (whether it merges,
    whether it works under activation checkpointing) is asked of the method, never typed here."""

    name: str  # what --methods / --method take
    label: str  # what tables show
    make_config: ConfigFactory
    learning_rate: float  # causal LMs
    encoder_learning_rate: float  # encoders with a new classification head
    shown: tuple[str, ...] = ()  # the config fields ``settings()`` prints
    summary: str = ""  # the settings in words, where the fields alone do not say them
    quantize: str | None = None  # the frozen base quantized (nf4 | fp4 | int8); None: as loaded
    in_default: bool = True  # among the methods compare runs without --methods
    # the lesson's "best for stacking tasks": adapters kept apart and composed, not merged
    composes: bool = False
    # the model kinds it applies to (peftlab.models.model_kind)
    kinds: tuple[str, ...] = ("causal", "seq2seq", "encoder")

    def config(self, model_config: Any = None, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftConfig | None:
        return self.make_config(model_config, task_type)

    def lr_for(self, model_kind: str) -> float:
        """The learning rate for a ``"causal"``, ``"seq2seq"`` (the language models' column) or
        ``"encoder"`` model."""
        return self.encoder_learning_rate if model_kind == "encoder" else self.learning_rate

    def applies_to(self, model_kind: str) -> bool:
        return model_kind in self.kinds

    @property
    def default_task_type(self) -> TaskType:
        """The task type of a language model it applies to (a seq2seq-only preset's: SEQ_2_SEQ_LM)."""
        return TaskType.SEQ_2_SEQ_LM if "causal" not in self.kinds else TaskType.CAUSAL_LM

    def _any_config(self) -> PeftConfig | None:
        """The config for a language model it applies to, model size unknown."""
        return self.config(None, self.default_task_type)

    @property
    def peft_type(self) -> str | None:
        config = self._any_config()
        return config.peft_type if config is not None else None

    @property
    def method(self) -> Method | None:
        """The adapter method the preset runs; None for full fine-tuning."""
        config = self._any_config()
        return method_for(config) if config is not None else None

    @property
    def mergeable(self) -> bool:
        """Whether the trained model runs at the base's speed: full fine-tuning, or a method that
        merges in place (not over a quantized base, whose merge gives a full-precision model)."""
        method = self.method
        return method is None or (method.mergeable and self.quantize is None)

    @property
    def supports_activation_checkpointing(self) -> bool:
        method = self.method
        return method is None or method.supports_activation_checkpointing

    @property
    def traits(self) -> tuple[str, ...]:
        """What the comparison report and recommend say of it: "mergeable", "composes"."""
        return (*(("mergeable",) if self.mergeable else ()), *(("composes",) if self.composes else ()))

    def settings(self) -> dict[str, Any]:
        """The settings to print (for a model of its first kind whose size is not known)."""
        config = self._any_config()
        out: dict[str, Any] = {"peft_type": config.peft_type if config is not None else None}
        values = config.to_dict() if config is not None else {}
        for name in self.shown:
            out[name] = "architecture default" if values[name] is None else values[name]
        if self.summary:
            out["note"] = self.summary
        return out


def hidden_size_of(model_config: Any) -> int | None:
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _full(model_config: Any, task_type: TaskType) -> None:
    return None


def _lora(model_config: Any, task_type: TaskType) -> PeftConfig:
    return LoraConfig(r=8, lora_alpha=16, task_type=task_type)


def _lora_all(model_config: Any, task_type: TaskType) -> PeftConfig:
    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type=task_type)


def _ia3(model_config: Any, task_type: TaskType) -> PeftConfig:
    return IA3Config(task_type=task_type)


def bottleneck_reduction(hidden_size: int | None) -> int | float:
    """The lesson's reduction factor, lowered so the bottleneck is at least MIN_BOTTLENECK wide:
    ``hidden_size // factor == max(MIN_BOTTLENECK, hidden_size // 64)`` (``hidden / 16`` is exact
    in binary floating point, so the floor division gives 16 exactly)."""
    if not hidden_size:
        return BOTTLENECK_REDUCTION
    factor = min(BOTTLENECK_REDUCTION, hidden_size / MIN_BOTTLENECK)
    return int(factor) if float(factor).is_integer() else factor


def _bottleneck(model_config: Any, task_type: TaskType) -> PeftConfig:
    return BottleneckConfig(
        mh_adapter=True,
        output_adapter=True,
        reduction_factor=bottleneck_reduction(hidden_size_of(model_config)),
        non_linearity="relu",
        task_type=task_type,
    )


def _prefix(model_config: Any, task_type: TaskType) -> PeftConfig:
    return PrefixTuningConfig(
        task_type=task_type, num_virtual_tokens=20, prefix_projection=task_type != TaskType.SEQ_CLS
    )


def _prefix_all(model_config: Any, task_type: TaskType) -> PeftConfig:
    return PrefixTuningConfig(
        task_type=task_type,
        num_virtual_tokens=20,
        prefix_projection=True,
        encoder_prefix=True,
        cross_prefix=True,
    )


PRESETS: dict[str, MethodPreset] = {
    p.name: p
    for p in (
        MethodPreset("full", "Full fine-tuning", _full, 5e-5, 1e-4, summary="all parameters trainable"),
        MethodPreset(
            "lora",
            "LoRA (r=8, q+v)",
            _lora,
            2e-3,
            2e-3,
            shown=("r", "lora_alpha", "target_modules"),
            summary="the query and value projections",
        ),
        MethodPreset(
            "lora-all",
            "LoRA (r=16, all-linear)",
            _lora_all,
            1e-3,
            1e-3,
            shown=("r", "lora_alpha", "target_modules"),
        ),
        MethodPreset(
            "bottleneck",
            "Bottleneck adapters",
            _bottleneck,
            2e-3,
            2e-3,
            shown=("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"),
            summary=f"after attention and after the FFN; reduction factor {BOTTLENECK_REDUCTION}, lowered "
            f"to keep the bottleneck at least {MIN_BOTTLENECK} wide",
            composes=True,
        ),
        MethodPreset(
            "prefix",
            "Prefix tuning",
            _prefix,
            1e-3,
            3e-2,
            shown=("num_virtual_tokens", "prefix_projection"),
            summary="plain vectors (no MLP) for classification heads",
        ),
        MethodPreset(
            "prefix-all",
            "Prefix tuning (enc+dec+cross)",
            _prefix_all,
            1e-3,
            1e-3,
            shown=("num_virtual_tokens", "prefix_projection", "encoder_prefix", "cross_prefix"),
            summary="encoder-decoders only: prefixes on encoder self-attention, decoder self-attention "
            "and cross-attention (the prefix-tuning paper's BART setting)",
            kinds=("seq2seq",),
        ),
        MethodPreset(
            "qlora",
            "LoRA on NF4 base",
            _lora,
            2e-3,
            2e-3,
            shown=("r", "lora_alpha", "target_modules"),
            summary="LoRA (r=8, q+v) over the base quantized to NF4 by bitsandbytes (QLoRA); needs "
            "peftlab[quant]",
            quantize="nf4",
            in_default=False,
        ),
        MethodPreset(
            "ia3",
            "IA3",
            _ia3,
            2e-2,
            2e-2,
            shown=("target_modules",),
            summary="the keys, values and FFN output projection",
        ),
    )
}
