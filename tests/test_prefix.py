"""Prefix tuning: shapes, masks, padding, positions, cached generation, training, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from conftest import _configs, build_model, sample_inputs
from peftlab import PeftConfig, PrefixTuningConfig, TaskType, get_peft_model
from peftlab.methods.prefix import PrefixEncoder

TASKS = {
    "llama": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "t5": "SEQ_2_SEQ_LM",
    "bart": "SEQ_2_SEQ_LM",
}
IMPLS = ("sdpa", "eager")
TOL = 1e-5


def _base(arch: str, impl: str = "sdpa", seed: int = 0) -> nn.Module:
    model = build_model(arch, seed=seed)
    model.set_attn_implementation(impl)
    return model


def _prefixed(arch: str, impl: str = "sdpa", seed: int = 0, **fields: Any) -> Any:
    fields.setdefault("num_virtual_tokens", 3)
    config = PrefixTuningConfig(task_type=TASKS[arch], **fields)
    torch.manual_seed(100 + seed)  # prefix vectors start random (N(0, 1)), far from a no-op
    return get_peft_model(_base(arch, impl, seed), config)


def _features(out: Any) -> list[torch.Tensor]:
    """Every output a user reads: logits and the last hidden states (encoder and decoder)."""
    found = [out.logits]
    for name in ("hidden_states", "decoder_hidden_states", "encoder_last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, tuple):
            value = value[-1]
        if isinstance(value, torch.Tensor):
            found.append(value)
    return found


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _features(model(**inputs, output_hidden_states=True))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# ---- config ---------------------------------------------------------------------------------
def test_config_needs_task_type_and_valid_values() -> None:
    with pytest.raises(ValueError, match="task_type"):
        PrefixTuningConfig()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0)
    with pytest.raises(ValueError, match="encoder_prefix"):
        PrefixTuningConfig(task_type="CAUSAL_LM", encoder_prefix=True)
    with pytest.raises(ValueError, match="init_weights"):
        PrefixTuningConfig(task_type="CAUSAL_LM", init_weights="ones")


def test_config_json_round_trip_and_derived_fields() -> None:
    model = _prefixed("llama")
    config = model.peft_config["default"]
    # PEFT's derived fields, from the model: 2 key/value heads x 8 dims (GQA), 2 layers
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    assert (config.num_transformer_submodules, config.encoder_hidden_size) == (1, 16)
    data = json.loads(config.to_json_string())
    assert data["peft_type"] == "PREFIX_TUNING" and "encoder_prefix" not in data
    again = PeftConfig.from_dict(data)
    assert again == config


def test_derived_fields_must_fit_the_model() -> None:
    config = PrefixTuningConfig(task_type="CAUSAL_LM", token_dim=32)  # llama's kv width is 16
    with pytest.raises(ValueError, match="token_dim=32 does not fit"):
        get_peft_model(build_model("llama"), config)


# ---- shapes and counts ------------------------------------------------------------------------
def test_shapes_follow_grouped_query_attention() -> None:
    model = _prefixed("llama", num_virtual_tokens=5)
    encoder = model.model_adapters["default"]
    # 2 layers x (key, value) x 2 kv heads x 8 dims
    assert tuple(encoder.embedding.weight.shape) == (5, 2 * 2 * 2 * 8)
    assert model.get_nb_trainable_parameters()[0] == 5 * 64


def _mistral_7b_on_meta(**fields: Any) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        base = MistralForCausalLM(config)
    return get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, **fields))


def test_counts_equal_peft_on_mistral_7b() -> None:
    assert _mistral_7b_on_meta().get_nb_trainable_parameters()[0] == 1_310_720
    assert _mistral_7b_on_meta(prefix_projection=True).get_nb_trainable_parameters()[0] == 68_244_480


# ---- the prefix acts, and only when active -------------------------------------------------------
@pytest.mark.parametrize("arch", list(TASKS))
def test_prefix_changes_outputs_and_disable_gives_base(arch: str) -> None:
    inputs = sample_inputs(arch)
    base = _run(_base(arch), inputs)
    model = _prefixed(arch)
    assert _max_diff(_run(model, inputs), base) > 1e-3
    with model.disable_adapter():
        assert _max_diff(_run(model, inputs), base) == 0.0
    # the base model itself is left untouched between calls
    assert model.base_model.config._attn_implementation == "sdpa"
    assert _max_diff(_run(model.base_model, inputs), base) == 0.0


@pytest.mark.parametrize("arch", list(TASKS))
def test_sdpa_and_eager_agree(arch: str) -> None:
    inputs = sample_inputs(arch)
    sdpa = _run(_prefixed(arch, "sdpa"), inputs)
    eager = _run(_prefixed(arch, "eager"), inputs)
    assert _max_diff(sdpa, eager) < TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_equals_explicit_prefix_in_cache(arch: str, impl: str) -> None:
    """Reference: the prefix put in transformers' own KV cache. Real tokens sit at positions
    0..q-1 on rotary models (peftlab converts their checkpoints instead) and after the prefix,
    3..q+2, on models with learned absolute positions, as in HF PEFT."""
    model = _prefixed(arch, impl)
    inputs = sample_inputs(arch)
    batch, q = inputs["input_ids"].shape
    table = model.model_adapters["default"].key_values().detach()  # (slots, heads, tokens, dims)
    layers = [
        (table[2 * i].expand(batch, -1, -1, -1), table[2 * i + 1].expand(batch, -1, -1, -1)) for i in range(2)
    ]
    first = 0 if arch == "llama" else 3
    base = model.base_model
    with torch.no_grad():
        ours = model(**inputs).logits
        reference = base(
            input_ids=inputs["input_ids"],
            attention_mask=torch.cat([torch.ones(batch, 3, dtype=torch.long), inputs["attention_mask"]], 1),
            cache=DynamicCache([(k.clone(), v.clone()) for k, v in layers], config=base.config),
            position_ids=(torch.arange(q) + first).expand(batch, -1),
        ).logits
    assert float((ours - reference).abs().max()) < TOL


def test_positions_past_the_embedding_are_refused() -> None:
    """GPT-2 numbers real tokens after the prefix: a prefix that pushes them past the model's
    positions is a clear error, not an index error deep in the embedding."""
    model = _prefixed("gpt2", "sdpa")
    limit = model.base_model.config.n_positions
    ids = torch.randint(3, 96, (1, limit - 1))
    with pytest.raises(ValueError, match=r"moves real tokens to position .* has only \d+ positions"):
        model(input_ids=ids)


# ---- padding ---------------------------------------------------------------------------------
def _padded_pair(arch: str) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], str]:
    """A batch of a short and a long sample, padded on the side the architecture uses, and
    each sample alone. Decoder-only models get position ids from the mask, as generate does."""
    g = torch.Generator().manual_seed(5)
    lengths = (4, 7)
    samples = [torch.randint(3, 96, (n,), generator=g) for n in lengths]
    side = "left" if arch in ("llama", "gpt2") else "right"
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, sample in enumerate(samples):
        where = slice(7 - len(sample), 7) if side == "left" else slice(0, len(sample))
        ids[row, where] = sample
        mask[row, where] = 1
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    alone: list[dict[str, torch.Tensor]] = [
        {"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in samples
    ]
    if side == "left":
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if arch in ("t5", "bart"):
        decoder = torch.randint(3, 96, (2, 5), generator=g)
        batch["decoder_input_ids"] = decoder
        for row, sample in enumerate(alone):
            sample["decoder_input_ids"] = decoder[row : row + 1]
    return batch, alone, side


def _real_part(tensor: torch.Tensor, row: int, length: int, side: str, encoder_side: bool) -> torch.Tensor:
    """Row ``row`` restricted to the real tokens (sequence dim 1) when it runs over the input."""
    out = tensor[row : row + 1]
    if encoder_side:
        out = out[:, -length:] if side == "left" else out[:, :length]
    return out


@pytest.mark.parametrize("arch", list(TASKS))
@pytest.mark.parametrize("impl", IMPLS)
def test_padded_batch_equals_each_sample_alone(arch: str, impl: str) -> None:
    batch, alone, side = _padded_pair(arch)
    model = _prefixed(arch, impl)
    together = _run(model, batch)
    lengths = [s["input_ids"].shape[1] for s in alone]
    # which outputs run over the (padded) input sequence: not logits of seq2seq / SEQ_CLS
    over_input = {
        "llama": [True, True],
        "gpt2": [True, True],
        "bert": [False, True],
        "t5": [False, False, True],
        "bart": [False, False, True],
    }[arch]
    for row, sample in enumerate(alone):
        single = _run(model, sample)
        for t, s, on_input in zip(together, single, over_input, strict=True):
            got = _real_part(t, row, lengths[row], side, on_input)
            assert got.shape == s.shape
            assert float((got - s).abs().max()) < TOL


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_and_cross_prefixes(arch: str) -> None:
    inputs = sample_inputs(arch)
    plain = _prefixed(arch)
    full = _prefixed(arch, encoder_prefix=True, cross_prefix=True)
    # decoder self + encoder self + decoder cross: 3 x 2 layers x (key, value) x 32
    assert tuple(full.model_adapters["default"].embedding.weight.shape) == (3, 3 * 2 * 2 * 32)
    assert full.peft_config["default"].to_dict()["encoder_prefix"] is True
    base_encoder = _run(_base(arch), inputs)[-1]
    assert float((_run(plain, inputs)[-1] - base_encoder).abs().max()) == 0.0  # PEFT: encoder untouched
    assert float((_run(full, inputs)[-1] - base_encoder).abs().max()) > 1e-3
    # the cross prefix alone changes the decoder output but not the encoder's
    cross = _prefixed(arch, cross_prefix=True)
    cross_out = _run(cross, inputs)
    assert float((cross_out[-1] - base_encoder).abs().max()) == 0.0
    assert _max_diff(cross_out[:1], _run(_base(arch), inputs)[:1]) > 1e-3


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_and_cross_prefixes_respect_padding(arch: str, impl: str) -> None:
    batch, alone, side = _padded_pair(arch)
    model = _prefixed(arch, impl, encoder_prefix=True, cross_prefix=True)
    together = _run(model, batch)
    for row, sample in enumerate(alone):
        single = _run(model, sample)
        length = sample["input_ids"].shape[1]
        for t, s, on_input in zip(together, single, [False, False, True], strict=True):
            assert float((_real_part(t, row, length, side, on_input) - s).abs().max()) < TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("routed", [False, True])
def test_t5_left_padded_decoder_rows_see_their_prefix_where_alone(impl: str, routed: bool) -> None:
    """T5's position bias gives the prefix the place just before each row's own first decoder
    token: a row left padded in the decoder (a cache of rows that joined at different steps),
    in one call and then one cached step, gives the logits it gives alone."""
    model = _prefixed("t5", impl).eval()
    g = torch.Generator().manual_seed(9)
    source = torch.randint(3, 96, (2, 5), generator=g)
    decoded = [torch.randint(3, 96, (n,), generator=g) for n in (2, 5)]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    for row, tokens in enumerate(decoded):
        ids[row, 5 - len(tokens) :], mask[row, 5 - len(tokens) :] = tokens, 1
    names = {"adapter_names": ["default", "default"]} if routed else {}
    step = torch.randint(3, 96, (2, 1), generator=g)
    with torch.no_grad():
        together = model(input_ids=source, decoder_input_ids=ids, decoder_attention_mask=mask,
                         use_cache=True, **names)  # fmt: skip
        following = model(input_ids=source, decoder_input_ids=step, cache=together.past_key_values,
                          decoder_attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                          **names)  # fmt: skip
        for row, tokens in enumerate(decoded):
            alone = model(input_ids=source[row : row + 1], decoder_input_ids=tokens[None], use_cache=True)
            n = len(tokens)
            torch.testing.assert_close(together.logits[row, -n:], alone.logits[0], atol=TOL, rtol=0)
            next_alone = model(input_ids=source[row : row + 1], decoder_input_ids=step[row : row + 1],
                               cache=alone.past_key_values)  # fmt: skip
            torch.testing.assert_close(following.logits[row], next_alone.logits[0], atol=TOL, rtol=0)


# ---- other heads ----------------------------------------------------------------------------------
def _head_model(arch: str, head: str, task: str) -> Any:
    import transformers

    _, config = _configs()[arch]
    config.num_labels = 3
    torch.manual_seed(0)
    base = getattr(transformers, head)(config).eval()
    torch.manual_seed(7)
    return get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=4))


@pytest.mark.parametrize(
    ("arch", "head", "task"),
    [
        ("llama", "LlamaForSequenceClassification", "SEQ_CLS"),
        ("bert", "BertForTokenClassification", "TOKEN_CLS"),
        ("bert", "BertModel", "FEATURE_EXTRACTION"),
    ],
)
def test_other_task_types_respect_padding(arch: str, head: str, task: str) -> None:
    model = _head_model(arch, head, task)
    batch, alone, side = _padded_pair(arch)
    with torch.no_grad():
        out = model(**batch)
        together = out.logits if hasattr(out, "logits") else out.last_hidden_state
        with model.disable_adapter():
            base = model(**batch)
            base_out = base.logits if hasattr(base, "logits") else base.last_hidden_state
        assert float((together - base_out).abs().max()) > 1e-4  # the prefix acts
        for row, sample in enumerate(alone):
            single = model(**sample)
            single_out = single.logits if hasattr(single, "logits") else single.last_hidden_state
            per_token = task != "SEQ_CLS"
            got = _real_part(together, row, sample["input_ids"].shape[1], side, per_token)
            assert float((got - single_out).abs().max()) < TOL


# ---- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
@pytest.mark.parametrize("impl", IMPLS)
def test_generate_with_cache_equals_without(arch: str, impl: str) -> None:
    batch, alone, _ = _padded_pair(arch)
    batch.pop("position_ids", None)
    batch.pop("decoder_input_ids", None)
    model = _prefixed(arch, impl)
    kwargs = {
        "max_new_tokens": 8,
        "min_new_tokens": 8,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
        with model.disable_adapter():
            base = model.generate(**batch, use_cache=True, **kwargs)
        singles = []
        for sample in alone:
            sample.pop("decoder_input_ids", None)
            singles.append(model.generate(**sample, use_cache=True, **kwargs).sequences[0])
    assert torch.equal(cached.sequences, uncached.sequences)
    # scores (-inf where min_new_tokens forbids EOS) agree step by step
    finite = [torch.nan_to_num(torch.stack(o.scores), neginf=0.0) for o in (cached, uncached, base)]
    assert float((finite[0] - finite[1]).abs().max()) < 1e-4
    # the prefix steers generation (scores of the first step already differ from the base's)
    assert float((finite[0][0] - finite[2][0]).abs().max()) > 1e-4
    for row, single in enumerate(singles):  # padding does not change what a sample generates
        new = single[-8:]
        assert torch.equal(cached.sequences[row, -8:], new)


def test_generate_beam_search_with_cache_equals_without() -> None:
    model = _prefixed("llama")
    inputs = sample_inputs("llama")
    kwargs = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(
            model.generate(**inputs, **kwargs), model.generate(**inputs, use_cache=False, **kwargs)
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_with_static_cache_equals_dynamic(impl: str) -> None:
    """A static cache is longer than the tokens seen: its unused tail must stay hidden."""
    model = _prefixed("llama", impl)
    inputs = sample_inputs("llama")
    kwargs = {
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        static = model.generate(**inputs, cache_implementation="static", **kwargs)
        dynamic = model.generate(**inputs, **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert float((torch.stack(static.scores) - torch.stack(dynamic.scores)).abs().max()) < 1e-4


# ---- projection, folding, several adapters ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_projection_and_fold(arch: str) -> None:
    model = _prefixed(arch, prefix_projection=True, encoder_hidden_size=24)
    encoder = model.model_adapters["default"]
    assert isinstance(encoder, PrefixEncoder) and encoder.transform is not None
    assert tuple(encoder.transform[0].weight.shape) == (24, encoder.embedding.weight.shape[1])
    inputs = sample_inputs(arch)
    before = _run(model, inputs)
    assert _max_diff(before, _run(_base(arch), inputs)) > 1e-3
    encoder.fold_projection()
    assert encoder.transform is None
    assert _max_diff(_run(model, inputs), before) < TOL
    model._update_trainable()
    slots = encoder.num_slots * encoder.kv_heads * encoder.head_dim
    assert model.get_nb_trainable_parameters()[0] == 3 * slots


def test_two_active_prefixes_concatenate() -> None:
    model = _prefixed("llama")
    torch.manual_seed(3)
    model.add_adapter("second", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.set_adapter(["default", "second"])
    inputs = sample_inputs("llama")
    both = _run(model, inputs)
    joined = _prefixed("llama", num_virtual_tokens=5)
    weights = [model.model_adapters[n].embedding.weight for n in ("default", "second")]
    with torch.no_grad():
        joined.model_adapters["default"].embedding.weight.copy_(torch.cat(weights))
    assert _max_diff(both, _run(joined, inputs)) < TOL


# ---- errors ----------------------------------------------------------------------------------
def test_merging_raises_a_clear_error() -> None:
    model = _prefixed("llama")
    with pytest.raises(ValueError, match="cannot be merged: prefix tuning adds learned key/value"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="no weight to fold"):
        model.merge_and_unload()


def test_unsupported_attention_implementation() -> None:
    base = build_model("llama")
    base.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'"):
        get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM"))


def test_gradient_checkpointing_is_refused() -> None:
    model = _prefixed("llama")
    model.base_model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**sample_inputs("llama"))


def test_wrong_checkpoint_shape() -> None:
    encoder = _prefixed("llama").model_adapters["default"]
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(3, 10\)"):
        encoder.load_prefix_vectors(torch.zeros(3, 10))


# ---- training ------------------------------------------------------------------------------------
def test_training_lowers_loss_and_changes_only_the_prefix() -> None:
    model = _prefixed("llama")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model_adapters.default.embedding.weight"
    ]
    optimizer = torch.optim.Adam(trainable, lr=0.2)
    batch = sample_inputs("llama", batch=4, seq=8)
    batch["labels"] = batch["input_ids"]
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model_adapters.default.embedding.weight"}


def test_eval_mode_task_type_enum() -> None:
    """The lesson's form, a TaskType member and a projected prefix, on a seq2seq model: in
    ``.eval()`` the output is deterministic and the prefix's, not the base's."""
    config = PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3, prefix_projection=True)
    assert config.task_type is TaskType.SEQ_2_SEQ_LM
    inputs = sample_inputs("bart")
    base = _run(_base("bart"), inputs)
    torch.manual_seed(100)
    model = get_peft_model(_base("bart"), config)
    assert model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    # bart's dropout (0.1) is live in training mode, so two calls differ there
    model.train()
    assert _max_diff(_run(model, inputs), _run(model, inputs)) > 1e-3
    model.eval()
    assert not any(m.training for m in model.modules())
    first, second = _run(model, inputs), _run(model, inputs)
    assert _max_diff(first, second) == 0.0
    assert _max_diff(first, base) > 1e-3
    with model.disable_adapter():
        assert _max_diff(_run(model, inputs), base) == 0.0
