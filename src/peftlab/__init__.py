"""peftlab: parameter-efficient fine-tuning (LoRA, bottleneck adapters, prefix tuning, IA3)
for any transformers model through one API, with checkpoints Hugging Face PEFT reads."""

from peftlab.composition import Parallel, Stack
from peftlab.config import PeftConfig, TaskType
from peftlab.methods.bottleneck import AdapterConfig, BottleneckConfig, HoulsbyConfig, PfeifferConfig
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.lora import LoraConfig
from peftlab.methods.prefix import PrefixTuningConfig
from peftlab.peft_model import PeftModel, get_peft_model

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
