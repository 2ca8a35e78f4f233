"""Tiny, randomly initialised transformers models built from configs: offline and fast.

``build_model(arch, seed, **fields)`` is deterministic; ``sample_inputs(arch)`` gives matching inputs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# compare measures forgetting on general prose fetched once with pip; the tests stay offline on a
# small prose file of their own (tests/test_forgetting.py covers the default sample's loading)
os.environ.setdefault("PEFTLAB_RETAIN_DATA", str(Path(__file__).parent / "data" / "retain.txt"))
transformers.logging.set_verbosity_error()
# The tiny models do microsecond-sized ops: with several threads on a busy machine they spend
# far longer in thread hand-offs than in arithmetic, so the whole suite runs on one thread
# (tests that run the real 135M model pass --threads themselves).
torch.set_num_threads(1)

VOCAB = 96

ARCHS = ("llama", "gpt2", "bert", "t5", "bart")


def _configs() -> dict[str, tuple[Callable[..., nn.Module], Any]]:
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    return {
        # grouped-query attention: 4 query heads share 2 key/value heads
        "llama": (
            LlamaForCausalLM,
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
        ),
        "gpt2": (
            GPT2LMHeadModel,
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        ),
        "bert": (
            BertForSequenceClassification,
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                num_labels=3,
                pad_token_id=0,
            ),
        ),
        "t5": (
            T5ForConditionalGeneration,
            T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            ),
        ),
        "bart": (
            BartForConditionalGeneration,
            BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
            ),
        ),
    }


def build_model(arch: str, seed: int = 0, **fields: Any) -> nn.Module:
    """The tiny ``arch`` model, with ``fields`` of its config changed (a vocabulary's size, its
    special tokens)."""
    model_cls, config = _configs()[arch]
    config.update(fields)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    return model


def sample_inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch in ("t5", "bart"):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---- tiny models saved with their own word-level tokenizers (offline, seconds) ----------------
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<eos>"]
WORDS = ["good", "great", "fine", "bad", "awful", "dull", "film", "movie", "plot", "the", "a", "was",
         "text", "label", "pos", "neg", "q", "ans", ":", "(", ")", "/", "x", "y", "z", "w"]  # fmt: skip
POSITIVE, NEGATIVE = ("good", "great", "fine"), ("bad", "awful", "dull")


def sentiment_texts(n: int) -> list[tuple[str, str]]:
    """Separable reviews: the sentiment word decides the label."""
    out = []
    for i in range(n):
        pos = i % 2 == 0
        word = (POSITIVE if pos else NEGATIVE)[i % 3]
        out.append((f"the {('film', 'movie', 'plot')[i % 3]} was {word}", "pos" if pos else "neg"))
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("bert")
    (path / "vocab.txt").write_text("\n".join(SPECIAL[:5] + WORDS) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)  # no head, like MiniLM: the classifier is new
    return path


def word_tokenizer(words: list[str], **special_tokens: str) -> Any:
    """A lower-casing word-level tokenizer over ``words`` (ids in that order), punctuation split
    off, with its special tokens (``eos_token="<eos>"`` ...; ``unk_token`` is required)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    vocab = SPECIAL + WORDS
    word_tokenizer(vocab, eos_token="<eos>", pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=5, eos_token_id=5)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop for the futures of serving jobs; nothing runs on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# ---- peftlab serve: saved adapters and the model they are checked against ------------------------
# (serve_helpers imports peftlab and HF PEFT: imported inside the fixtures, only by tests that ask)
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapter of each method (lora, ia3, bn, prefix) on the tiny llama, away from identity,
    each saved in its own folder under one root; made once per test module."""
    from serve_helpers import save_adapters

    return save_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> Any:
    """The tiny llama with every adapter in ``folders`` loaded the ordinary way: what a server
    answers is checked against what this model generates with each adapter alone."""
    from serve_helpers import loaded_model

    return loaded_model(folders)
