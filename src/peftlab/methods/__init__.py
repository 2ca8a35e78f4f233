"""The built-in methods, a module each (prefix tuning, the one model-level method, a package);
registering a method is one line here (a method of your own registers itself the same way:
``register_method(MyMethod())``)."""

from peftlab.core.registry import register_method
from peftlab.methods.bottleneck import BottleneckMethod
from peftlab.methods.ia3 import IA3Method
from peftlab.methods.lora import LoraMethod
from peftlab.methods.prefix import PrefixTuningMethod

register_method(LoraMethod())
register_method(IA3Method())
register_method(PrefixTuningMethod())
register_method(BottleneckMethod())
