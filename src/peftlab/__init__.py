"""peftlab: parameter-efficient fine-tuning (LoRA, bottleneck adapters, prefix tuning, IA3)
for any transformers model through one API, with checkpoints Hugging Face PEFT reads."""

import peftlab.methods  # noqa: F401  (registers the built-in methods)
from peftlab.core.composition import Parallel, Stack
from peftlab.core.config import PeftConfig, TaskType
from peftlab.core.peft_model import PeftModel, get_peft_model
from peftlab.methods.bottleneck import AdapterConfig, BottleneckConfig, HoulsbyConfig, PfeifferConfig
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.lora import LoraConfig
from peftlab.methods.prefix import PrefixTuningConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "BottleneckConfig",
    "HoulsbyConfig",
    "IA3Config",
    "LoraConfig",
    "Parallel",
    "PeftConfig",
    "PeftModel",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "Stack",
    "TaskType",
    "__version__",
    "get_peft_model",
]
