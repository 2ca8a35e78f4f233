"""The method registry: ``peft_type`` -> method. Adding a method is one line here."""

from __future__ import annotations

from peftlab.config import PeftConfig
from peftlab.methods.base import Method
from peftlab.methods.bottleneck import BottleneckMethod
from peftlab.methods.ia3 import IA3Method
from peftlab.methods.lora import LoraMethod
from peftlab.methods.prefix import PrefixTuningMethod

METHODS: dict[str, Method] = {
    m.peft_type: m for m in (LoraMethod(), IA3Method(), PrefixTuningMethod(), BottleneckMethod())
}


def method_for(config: PeftConfig) -> Method:
    return get_method(config.peft_type)


def get_method(peft_type: str) -> Method:
    try:
        return METHODS[peft_type]
    except KeyError:
        raise ValueError(
            f"unknown peft_type {peft_type!r}; peftlab supports {', '.join(sorted(METHODS))}"
        ) from None


def config_class_for(peft_type: str) -> type[PeftConfig]:
    return get_method(peft_type).config_class
