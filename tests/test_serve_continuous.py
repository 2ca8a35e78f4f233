"""Continuous batching (``peftlab.serving.continuous``) without HTTP: rows of every method (and
the base) join and leave a running batch mid-generation, with padding on both sides of each
join, and every row's tokens and logits stay those of the row decoded alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import serve_helpers
from conftest import build_model
from peftlab import PeftModel
from peftlab.serving.continuous import RunningBatch, cache_argument
from peftlab.serving.decoding import StopRules
from peftlab.serving.jobs import Row, SamplingParams, StreamChunk
from peftlab.serving.static import generate_batch
from serve_helpers import (
    EOS,
    PAD,
    Recorder,
    adapted_model,
    alone,
    check_alone,
    make_row,
    scheduled,
    tokenizer,
)
from suite_helpers import perturb

BASE = "__base__"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request: pytest.FixtureRequest) -> PeftModel:
    # llama: rotary positions, grouped-query attention; gpt2: learned absolute positions, which
    # a prefix shifts per row
    return adapted_model(str(request.param))


def new_batch(model: PeftModel, recorder: Recorder | None = None) -> RunningBatch:
    rules = StopRules(tokenizer(), {EOS}, lambda row, chunk: None)
    return RunningBatch(model, rules, PAD, observer=recorder)


def check_cache(batch: RunningBatch) -> None:
    """One cache row per running row, and no column that no row uses."""
    if not batch.rows:
        assert batch.cache is None and batch.mask is None
        return
    assert batch.mask is not None
    width = max(batch.lengths)
    for layer in batch.cache.layers:
        assert layer.keys.shape[0] == len(batch.rows) and layer.keys.shape[2] == width
    assert batch.mask.shape == (len(batch.rows), width)
    assert batch.mask.sum(1).tolist() == batch.lengths


def run(batch: RunningBatch, schedule: dict[int, list[Row]]) -> list[dict[str, Any]]:
    return serve_helpers.run(batch, schedule, check_cache)


# (adapter, prompt ids, max_tokens, step it joins at): prompts of different lengths, so joins
# pad the running cache (a longer newcomer) and the newcomer (a shorter one)
PLAN = [
    ("lora", [5, 9, 13, 40], 9, 0),
    ("prefix", [70, 3], 7, 0),
    (BASE, [11, 12, 13, 14, 15, 16, 17], 6, 2),
    ("bn", [88], 8, 3),
    ("ia3", [20, 21, 22], 7, 3),
    ("prefix", [30, 31, 32, 33, 34, 35, 36, 37, 38], 5, 5),
    ("lora", [41], 4, 6),
    ("ia3", [60, 61, 62, 63, 64, 65], 3, 9),
]


def test_rows_of_every_method_join_and_leave_mid_generation(
    model: PeftModel, loop: asyncio.AbstractEventLoop
) -> None:
    recorder = Recorder()
    batch = new_batch(model, recorder)
    rows, schedule = scheduled(loop, PLAN)
    steps = run(batch, schedule)
    check_alone(model, rows, PLAN, recorder)
    # the schedule really did what it claims: all five (four methods and the base) decoded in
    # one batch, rows joined while others were mid-generation and left while others went on
    assert max(len(set(b)) for b in recorder.batches) == 5
    assert any(s["joined"] and any(r.tokens for r in s["running"]) for s in steps)
    assert any(s["left"] and len(s["running"]) > len(s["left"]) for s in steps)
    # and every row's output depends on its adapter
    outputs = {a: r.tokens for r, (a, p, _, _) in zip(rows, PLAN, strict=True) if p == [5, 9, 13, 40]}
    assert outputs["lora"] != alone(model, BASE, [5, 9, 13, 40], 9)[0]


def test_seeded_sampling_is_the_same_alone_and_batched(
    model: PeftModel, loop: asyncio.AbstractEventLoop
) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=11)
    solo_row = make_row(loop, "prefix", [5, 6, 7], params)
    run(new_batch(model), {0: [solo_row]})
    # the same request joining a busy batch at step 2, beside greedy and other sampled rows
    rows = [make_row(loop, a, p, SamplingParams(max_tokens=6)) for a, p, _, _ in PLAN[:3]]
    other = make_row(loop, "bn", [9, 10], SamplingParams(max_tokens=8, temperature=0.9, seed=3))
    same = make_row(loop, "prefix", [5, 6, 7], params)
    reseeded = make_row(
        loop, "prefix", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=12)
    )
    run(new_batch(model), {0: rows, 1: [other], 2: [same, reseeded]})
    assert same.tokens == solo_row.tokens
    assert reseeded.tokens != solo_row.tokens  # the seed matters
    greedy = alone(model, "prefix", [5, 6, 7], 8)[0]
    assert solo_row.tokens != greedy  # and it really sampled
    # static batching draws the same tokens from the same seed
    static_row = make_row(loop, "prefix", [5, 6, 7], params)
    generate_batch(model, StopRules(tokenizer(), {EOS}, lambda r, c: None), [static_row], PAD)
    assert static_row.tokens == solo_row.tokens


def test_a_cancelled_row_leaves_at_the_next_step(model: PeftModel, loop: asyncio.AbstractEventLoop) -> None:
    batch = new_batch(model)
    rows = [
        make_row(loop, a, p, SamplingParams(max_tokens=12))
        for a, p in (("lora", [5, 6]), ("bn", [7]), (BASE, [8, 9, 10]))
    ]
    batch.step(rows)
    batch.step()
    made = len(rows[1].tokens)
    rows[1].job.cancel()
    report = batch.step()
    assert report.left == [rows[1]] and rows[1].finish_reason == "cancelled"
    assert len(rows[1].tokens) == made  # nothing more was decoded for it
    assert batch.rows == [rows[0], rows[2]]
    check_cache(batch)
    run(batch, {0: []})
    for row, (adapter, prompt) in zip(
        (rows[0], rows[2]), (("lora", [5, 6]), (BASE, [8, 9, 10])), strict=True
    ):
        assert row.tokens == alone(model, adapter, prompt, 12)[0]


def test_stop_strings_and_eos_end_a_row_at_once(model: PeftModel, loop: asyncio.AbstractEventLoop) -> None:
    tok = tokenizer()
    prompt = [56, 8, 36, 68, 65, 54, 41]
    full = alone(model, "lora", prompt, 8)[0]
    text = tok.decode(full, skip_special_tokens=True).split(" ")
    # the first word not said before it: the text up to it is what the stop string leaves
    cut = next(k for k in range(1, len(text)) if text[k] not in text[:k])
    stop = " " + text[cut]
    chunks: list[StreamChunk] = []
    rules = StopRules(tok, {EOS}, lambda row, chunk: chunks.append(chunk))
    batch = RunningBatch(model, rules, PAD)
    stopped = make_row(loop, "lora", prompt, SamplingParams(max_tokens=8, stop=(stop,)))
    stopped.job.events = asyncio.Queue()  # streamed: chunks come as text becomes final
    longer = make_row(loop, "ia3", [45, 8], SamplingParams(max_tokens=8))
    steps = run(batch, {0: [stopped, longer]})
    assert stopped.text == " ".join(text[:cut]) and stopped.finish_reason == "stop"
    assert len(stopped.tokens) == cut + 1  # decoding stopped at the token that completed it
    assert "".join(c.text for c in chunks) == stopped.text and chunks[-1].finish_reason == "stop"
    assert next(r for s in steps for r in s["left"]) is stopped  # and it left before the other row
    assert longer.tokens == alone(model, "ia3", [45, 8], 8)[0]
    # a row whose first token is an eos ends at its prefill; the row beside it goes on
    first = full[0]
    forced = RunningBatch(model, StopRules(tok, {first}, lambda r, c: None), PAD)
    ends = make_row(loop, "lora", prompt, SamplingParams(max_tokens=8))
    other = make_row(loop, BASE, [12, 90], SamplingParams(max_tokens=8))
    report = forced.step([ends, other])
    assert report.left == [ends] and ends.tokens == [] and ends.finish_reason == "stop"
    run(forced, {0: []})
    assert other.tokens == alone(model, BASE, [12, 90], 8, eos=first)[0]


def test_cache_argument_sends_encoder_decoders_to_their_batch_and_refuses_sliding_windows() -> None:
    # an encoder-decoder's rows run in EncoderDecoderBatch (test_serve_seq2seq.py), not here
    with pytest.raises(ValueError, match="EncoderDecoderBatch"):
        cache_argument(build_model("t5"))
    from transformers import MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(
        MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    )  # fmt: skip
    with pytest.raises(ValueError, match="sliding windows"):
        cache_argument(sliding)
    assert cache_argument(build_model("llama")) in ("cache", "past_key_values")


def test_decoding_steps_reuse_gathered_weights_and_see_changed_adapters(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftlab.methods import lora

    stacked = lora._stacked
    gathers = [0]

    def spy(*args: Any) -> Any:
        gathers[0] += 1
        return stacked(*args)

    monkeypatch.setattr(lora, "_stacked", spy)
    model = adapted_model("llama")
    batch = new_batch(model)
    first = make_row(loop, "lora", [5, 6, 7], SamplingParams(max_tokens=6))
    steady = make_row(loop, "ia3", [8, 9], SamplingParams(max_tokens=40))
    batch.step([first, steady])
    batch.step()
    made = gathers[0]
    assert made > 0
    for _ in range(2):  # the same rows decode on: nothing is stacked or gathered again
        batch.step()
        assert gathers[0] == made and batch.rows == [first, steady]
    while first.finish_reason is None:
        batch.step()
    old = alone(model, "lora", [5, 6, 7], 6)[0]
    assert first.tokens == old
    # the adapter's weights change in place while the batch runs; a row joining it sees them
    perturb([p for k, p in model.adapter_parameters("lora").items() if "lora_B" in k], seed=9)
    again = make_row(loop, "lora", [5, 6, 7], SamplingParams(max_tokens=4))
    batch.step([again])
    while again.finish_reason is None:
        batch.step()
    assert again.tokens == alone(model, "lora", [5, 6, 7], 4)[0] != old
    assert steady.finish_reason is None  # the other rows ran on beside it
    run(batch, {0: []})
    assert steady.tokens == alone(model, "ia3", [8, 9], 40)[0]


def test_a_long_prompt_is_prefilled_in_chunks_while_other_rows_decode(
    loop: asyncio.AbstractEventLoop,
) -> None:
    model = adapted_model(base=build_model("llama", max_position_embeddings=256))
    recorder = Recorder()
    rules = StopRules(tokenizer(), {EOS}, lambda row, chunk: None)
    batch = RunningBatch(model, rules, PAD, observer=recorder, max_prefill_tokens=32)
    prompt = [3 + (7 * i) % 90 for i in range(200)]
    plan = [
        ("lora", [5, 9, 13, 40], 30, 0),
        ("prefix", [70, 3], 30, 0),
        (BASE, [11, 12, 13], 30, 0),
        ("bn", prompt, 6, 2),  # arrives while the others decode: 7 chunks of at most 32 tokens
        ("ia3", [20, 21, 22], 5, 3),  # admitted behind it, prefilled after its last chunk
        ("prefix", prompt[:50], 4, 3),  # chunked too, through a prefix
    ]
    rows, schedule = scheduled(loop, plan)
    decoding: list[int] = []
    step = 0
    while step <= max(schedule) or batch.rows or batch.prefills:
        report = batch.step(schedule.get(step, []))
        assert report.prefill_tokens <= 32
        if rows[3] in batch.prefilling:
            decoding.append(report.decoded)
        check_cache(batch)
        step += 1
        assert step < 200
    # the running rows decoded at every step of the long prompt's prefill
    assert len(decoding) == 6 and all(n == 3 for n in decoding)
    check_alone(model, rows, plan, recorder)


@pytest.mark.parametrize("running_tokens", [3, 4], ids=["ends-mid-prefill", "ends-at-last-chunk"])
def test_a_chunked_prompt_survives_every_running_row_ending(
    loop: asyncio.AbstractEventLoop, running_tokens: int
) -> None:
    """The only running row ends while a 96-token prompt is prefilled in chunks of 32: in the
    step of its second chunk (3 tokens) or of its last (4), when the prompt's rows join after the
    decoding. The prompt's row is neither dropped nor stalled, and equals itself alone."""
    model = adapted_model(base=build_model("llama", max_position_embeddings=128))
    recorder = Recorder()
    rules = StopRules(tokenizer(), set(), lambda row, chunk: None)
    batch = RunningBatch(model, rules, PAD, observer=recorder, max_prefill_tokens=32)
    plan = [
        ("lora", [5, 9, 13, 40], running_tokens, 0),
        ("prefix", [3 + (7 * i) % 90 for i in range(96)], 5, 1),
    ]
    rows, schedule = scheduled(loop, plan)
    step = 0
    while step <= max(schedule) or batch.rows or batch.prefills:
        batch.step(schedule.get(step, []))
        check_cache(batch)
        step += 1
        assert step < 20
    assert [len(r.tokens) for r in rows] == [running_tokens, 5]
    check_alone(model, rows, plan, recorder)
