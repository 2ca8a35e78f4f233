"""Per-architecture defaults: which modules each method targets when the config says None.

Names are whole dotted-path suffixes (see :mod:`peftlab.injection`); a string is a regex
matched against the full module name. Adding an architecture is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

Targets = list[str] | str


@dataclass(frozen=True)
class ArchDefaults:
    lora: Targets
    ia3: Targets
    ia3_feedforward: Targets
    # bottleneck adapters: the attention block's output projection and the FFN's output
    # projection, both before their residual add
    attn_output: Targets
    ffn_output: Targets


_LLAMA_LIKE = ArchDefaults(
    lora=["q_proj", "v_proj"],
    ia3=["k_proj", "v_proj", "down_proj"],
    ia3_feedforward=["down_proj"],
    attn_output=["o_proj"],
    ffn_output=["down_proj"],
)
_BERT_LIKE = ArchDefaults(
    lora=["query", "value"],
    ia3=["key", "value", "output.dense"],
    ia3_feedforward=["output.dense"],
    attn_output=["attention.output.dense"],
    ffn_output=r".*\.layer\.\d+\.output\.dense",
)

ARCHITECTURES: dict[str, ArchDefaults] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": ArchDefaults(
        lora=["c_attn"],
        ia3=["c_attn", "mlp.c_proj"],
        ia3_feedforward=["mlp.c_proj"],
        attn_output=["attn.c_proj"],
        ffn_output=["mlp.c_proj"],
    ),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "t5": ArchDefaults(
        lora=["q", "v"],
        ia3=["k", "v", "wo"],
        ia3_feedforward=["wo"],
        attn_output=["SelfAttention.o", "EncDecAttention.o"],
        ffn_output=["DenseReluDense.wo"],
    ),
    "bart": ArchDefaults(
        lora=["q_proj", "v_proj"],
        ia3=["k_proj", "v_proj", "fc2"],
        ia3_feedforward=["fc2"],
        attn_output=["self_attn.out_proj", "encoder_attn.out_proj"],
        ffn_output=["fc2"],
    ),
}


def defaults_for(model_type: str | None) -> ArchDefaults | None:
    return ARCHITECTURES.get(model_type or "")
