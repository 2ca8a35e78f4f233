"""The prefix-tuning config, and the fields of it derived from the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftlab.core.config import PeftConfig, TaskType, check_positive_int


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Configuration of a prefix-tuning adapter; field names and meanings follow HF PEFT.

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules``
    are derived from the model when the adapter is created (as PEFT does) and written to the
    saved config; set by hand they must agree with the model.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    task_type: TaskType | str | None = None
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    encoder_prefix: bool = False
    cross_prefix: bool = False
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if self.task_type is None:
            raise ValueError(
                "task_type: prefix tuning needs one (CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS or "
                "FEATURE_EXTRACTION) to lay out its prefix"
            )
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("prefix_projection", "encoder_prefix", "cross_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        for name in ("encoder_hidden_size", "token_dim", "num_layers", "num_attention_heads"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules: must be 1, 2 or None (derived from task_type), "
                f"got {self.num_transformer_submodules!r}"
            )
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights: must be None (random) or 'zero', got {self.init_weights!r}")
        if (self.encoder_prefix or self.cross_prefix) and self.task_type != TaskType.SEQ_2_SEQ_LM:
            raise ValueError(
                "encoder_prefix / cross_prefix apply to encoder-decoder models: set task_type='SEQ_2_SEQ_LM' "
                "or leave them False"
            )
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save: must be a list of module names, got {self.modules_to_save!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # peftlab-only layout switches are written only when on, so PEFT reads the usual config as is
        for name in ("encoder_prefix", "cross_prefix"):
            if not out[name]:
                del out[name]
        return out


def fill_derived(config: PrefixTuningConfig, num_layers: int, kv_heads: int, head_dim: int) -> None:
    """Fill PEFT's derived fields from the model, or check the ones already set agree with it."""
    derived = {
        "num_layers": num_layers,
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_transformer_submodules": 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1,
    }
    for name, value in derived.items():
        current = getattr(config, name)
        if current is None:
            setattr(config, name, value)
        elif current != value and name != "num_transformer_submodules":
            raise ValueError(
                f"PrefixTuningConfig.{name}={current} does not fit this model ({name}={value} with "
                f"{num_layers} layers, {kv_heads} key/value heads of {head_dim} dims); the adapter was made "
                "for another model, or leave the field unset"
            )
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
