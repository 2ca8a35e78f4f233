"""The method registry: ``peft_type`` -> the :class:`~peftlab.core.method.Method` that implements it.

A method registers itself with one call, :func:`register_method` (the built-in ones in
``peftlab/methods/__init__.py``, one line each); everything else (configs read from a file,
``get_peft_model``, checkpoints, merging, weighted combination) finds it here.
"""

from __future__ import annotations

from peftlab.core.config import PeftConfig, register_config_class, unregister_config_class
from peftlab.core.method import Method

_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` (and its config class, for ``PeftConfig.from_dict``) known under its
    ``peft_type``; returns it. Registering a second method for a taken type is an error."""
    peft_type = method.peft_type
    if not peft_type or method.config_class.peft_type != peft_type:
        raise ValueError(
            f"{type(method).__name__}: peft_type {peft_type!r} must be set and equal its config class's "
            f"({method.config_class.__name__}.peft_type = {method.config_class.peft_type!r})"
        )
    if peft_type in _METHODS and _METHODS[peft_type] is not method:
        raise ValueError(f"a method for peft_type {peft_type!r} is registered already")
    _METHODS[peft_type] = method
    register_config_class(method.config_class)
    return method


def unregister_method(peft_type: str) -> None:
    """Forget a method registered with :func:`register_method` (for tests and plugins)."""
    _METHODS.pop(peft_type, None)
    unregister_config_class(peft_type)


def registered_types() -> list[str]:
    return sorted(_METHODS)


def get_method(peft_type: str) -> Method:
    try:
        return _METHODS[peft_type]
    except KeyError:
        raise ValueError(
            f"unknown peft_type {peft_type!r}; peftlab supports {', '.join(registered_types())}"
        ) from None


def method_for(config: PeftConfig) -> Method:
    return get_method(config.peft_type)
