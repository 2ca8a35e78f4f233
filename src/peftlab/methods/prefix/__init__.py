"""Prefix tuning: learned key/value vectors in front of every attention layer
(Li & Liang, 2021, arXiv:2101.00190).

Each adapted attention layer attends over ``num_virtual_tokens`` learned keys ``P_k`` and
values ``P_v`` before the real ones:

    Attention(Q, K, V) = softmax(Q [P_k; K]^T * scale + [0; M]) [P_v; V]

The prefix is visible to every real token (its mask columns are 0 / True) while padding
and causality among real tokens are kept (``M``). Per layer ``P_k`` and ``P_v`` have the
model's key/value shape, ``num_key_value_heads x head_dim`` (grouped-query attention).
With ``prefix_projection`` they are produced by ``Linear -> tanh -> Linear`` from a small
embedding; :meth:`PrefixEncoder.fold_projection` replaces that MLP by the vectors it yields.

One module per part, each importing only those listed before it:

- ``config``: :class:`PrefixTuningConfig` and its fields derived from the model;
- ``sites``: the attention modules a prefix enters and the slots of the prefix each reads
  (HF PEFT's layout);
- ``call``: the prefixes in force for one forward call;
- ``positions``: where real tokens stand after the prefix (learned absolute and rotary positions);
- ``attention``: the seam, a wrapper in transformers' attention interface, with its masks;
- ``encoder``: :class:`PrefixEncoder`, one adapter's prefix and its scopes over a model's calls;
- ``method``: :class:`PrefixTuningMethod`, what the framework and applications ask of the method.
"""

from peftlab.methods.prefix.config import PrefixTuningConfig
from peftlab.methods.prefix.encoder import PrefixEncoder
from peftlab.methods.prefix.method import PrefixTuningMethod
from peftlab.methods.prefix.sites import model_kv_shape

__all__ = ["PrefixEncoder", "PrefixTuningConfig", "PrefixTuningMethod", "model_kv_shape"]
