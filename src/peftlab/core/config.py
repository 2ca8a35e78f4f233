"""Config base class, task types and the validation helpers every method config uses.

A config is a dataclass validated on construction. ``to_dict`` / ``from_dict`` round-trip
through JSON and use Hugging Face PEFT's field names and ``peft_type`` values, so an
``adapter_config.json`` written by either library reads in the other.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="PeftConfig")


class TaskType(str, enum.Enum):
    """What the wrapped model is for; decides task-specific defaults (e.g. a trainable head)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# heads that PEFT trains in full for classification tasks (only those present are used, and
# PEFT lists them in a saved config's modules_to_save)
TASK_HEADS: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
}


# Fields HF PEFT writes into adapter_config.json that carry no behaviour for peftlab
# (bookkeeping, or options whose only value we support is PEFT's default). Reading them
# is safe; any *other* unknown field is an error, so no option is silently ignored.
PEFT_BOOKKEEPING_FIELDS: frozenset[str] = frozenset(
    {
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
    }
)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_jsonable(v) for v in value]
    return value


@dataclasses.dataclass
class PeftConfig:
    """Fields and behaviour shared by every method config.

    Subclasses set ``peft_type`` (the value PEFT writes in ``adapter_config.json``) and
    extend ``validate``. ``PEFT_DEFAULTS`` lists PEFT-only fields that peftlab accepts
    when reading a PEFT config, with the one value it supports for each.
    """

    peft_type: ClassVar[str] = ""
    PEFT_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        task_type = getattr(self, "task_type", None)
        if isinstance(task_type, str) and not isinstance(task_type, TaskType):
            setattr(self, "task_type", _parse_task_type(task_type))  # noqa: B010
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from a dict (ours or PEFT's), dispatching on ``peft_type``.

        Called on ``PeftConfig`` itself it picks the subclass from ``peft_type``; called on a
        subclass it checks that ``peft_type`` (when present) agrees.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if isinstance(peft_type, enum.Enum):
            # PEFT's to_dict() keeps its PeftType enum, whose str() is "PeftType.LORA"
            peft_type = peft_type.value
        target: type[PeftConfig] = cls
        if cls is PeftConfig:
            if peft_type is None:
                raise ValueError(
                    "config has no 'peft_type': add one of "
                    f"{', '.join(_known_peft_types())} so peftlab knows which method it describes"
                )
            target = config_class_for(str(peft_type))
        elif peft_type is not None and str(peft_type) != cls.peft_type:
            raise ValueError(
                f"config has peft_type {peft_type!r} but {cls.__name__} expects {cls.peft_type!r}"
            )
        names = {f.name for f in dataclasses.fields(target)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in PEFT_BOOKKEEPING_FIELDS:
                continue
            elif key in target.PEFT_DEFAULTS:
                if value != target.PEFT_DEFAULTS[key] and value not in (None, [], {}):
                    raise ValueError(
                        f"{target.__name__}: field {key!r}={value!r} is a PEFT option peftlab does "
                        f"not support (only {target.PEFT_DEFAULTS[key]!r}); remove it or use HF PEFT "
                        "for this adapter"
                    )
            else:
                raise ValueError(
                    f"{target.__name__}: unknown field {key!r}; known fields are {', '.join(sorted(names))}"
                )
        return target(**kwargs)  # type: ignore[return-value]


# peft_type -> config class, filled by peftlab.core.registry.register_method
_CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


def register_config_class(cls: type[PeftConfig]) -> None:
    _CONFIG_CLASSES[cls.peft_type] = cls


def unregister_config_class(peft_type: str) -> None:
    _CONFIG_CLASSES.pop(peft_type, None)


def _known_peft_types() -> list[str]:
    return sorted(_CONFIG_CLASSES)


def config_class_for(peft_type: str) -> type[PeftConfig]:
    """The config class registered for ``peft_type``."""
    try:
        return _CONFIG_CLASSES[peft_type]
    except KeyError:
        raise ValueError(
            f"unknown peft_type {peft_type!r}; peftlab supports {', '.join(_known_peft_types())}"
        ) from None


def _parse_task_type(value: str) -> TaskType:
    try:
        return TaskType(value)
    except ValueError:
        raise ValueError(
            f"task_type: {value!r} is not a task type; use one of {', '.join(t.value for t in TaskType)}"
        ) from None


def normalize_targets(field: str, value: Any) -> list[str] | str | None:
    """Validate a ``target_modules``-like field: a list of name suffixes, a regex, or None."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise ValueError(f"{field}: empty string; give module-name suffixes, a regex or None")
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not items or not all(isinstance(v, str) and v for v in items):
            raise ValueError(f"{field}: must be a non-empty list of module-name suffixes, got {value!r}")
        return items
    raise ValueError(f"{field}: expected a list of names, a regex string or None, got {value!r}")


def check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}: must be a positive integer, got {value!r}")


def check_module_names(field: str, value: Any) -> list[str] | None:
    """Validate a ``modules_to_save``-like field: a list of module names, or None."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field}: must be a list of module names, got {value!r}")
    return list(value)


def check_probability(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{field}: must be a number in [0, 1), got {value!r}")
