"""``peftlab serve`` on encoder-decoders: a tiny T5 (relative positions) and a tiny BART (learned
absolute decoder positions) built from configs, with adapters of every method moved away from
identity.

Continuous batching: rows of every method join and leave a running batch at different steps,
each keeping its own encoder output, cache rows and (on BART) decoder positions, and every
row's tokens and logits are those of ``generate`` with its adapter alone. Static batching gives
the same. Through HTTP the server answers completions and chat the same way; a decoder that
numbers positions in a way continuous batching cannot give each row is refused with a pointer
to static batching, and an encoder-only model is refused at start in one line.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from torch import nn

from peftlab import PeftModel
from peftlab.cli import main
from peftlab.serving.continuous import RunningBatch
from peftlab.serving.decoding import StopRules
from peftlab.serving.encoder_decoder import EncoderDecoderBatch
from peftlab.serving.jobs import SamplingParams
from peftlab.serving.static import generate_batch
from serve_helpers import (
    EOS,
    PAD,
    Recorder,
    alone,
    check_alone,
    concurrently,
    loaded_model,
    make_row,
    run,
    save_adapters,
    scheduled,
    serve_model,
    serving,
    tokenizer,
)

BASE = "__base__"


@pytest.fixture(scope="module", params=["t5", "bart"])
def arch(request: pytest.FixtureRequest) -> str:
    # t5: relative positions; bart: learned absolute decoder positions, renumbered per row
    return str(request.param)


@pytest.fixture(scope="module")
def adapter_folders(arch: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_adapters(tmp_path_factory.mktemp(f"{arch}-adapters"), arch)


@pytest.fixture(scope="module")
def adapted(arch: str, adapter_folders: dict[str, Path]) -> PeftModel:
    return loaded_model(adapter_folders, arch)


def rules() -> StopRules:
    return StopRules(tokenizer(), {EOS}, lambda r, c: None)


def check_cache(batch: EncoderDecoderBatch) -> None:
    """One row of every cache and encoder tensor per running row, no column no row uses."""
    if not batch.rows:
        assert batch.cache is None and batch.mask is None and batch.encoder is None
        return
    assert batch.mask is not None and batch.encoder_mask is not None and batch.encoder is not None
    n, source = len(batch.rows), max(len(r.prompt_ids) for r in batch.rows)
    for layer in batch.cache.self_attention_cache.layers:
        assert layer.keys.shape[0] == n and layer.keys.shape[2] == max(batch.lengths)
    for layer in batch.cache.cross_attention_cache.layers:
        assert layer.keys.shape[0] == n and layer.keys.shape[2] == source
    assert batch.mask.sum(1).tolist() == batch.lengths
    assert batch.encoder_mask.sum(1).tolist() == [len(r.prompt_ids) for r in batch.rows]
    assert batch.encoder.shape[:2] == (n, source)


# (adapter, prompt ids, max_tokens, step it joins at): prompts of different lengths and rows
# joining mid-generation, so both the decoder cache (on the left) and the source columns (on
# the right) are padded on joins
PLAN = [
    ("lora", [5, 9, 13, 40], 9, 0),
    ("prefix", [70, 3], 7, 0),
    (BASE, [11, 12, 13, 14, 15, 16, 17], 6, 2),
    ("bn", [88], 8, 3),
    ("ia3", [20, 21, 22], 7, 3),
    ("prefix_all", [30, 31, 32, 33, 34, 35, 36, 37, 38], 5, 4),
    ("prefix", [30, 31, 32, 33, 34, 35, 36, 37, 38], 6, 5),
    ("lora", [41], 4, 6),
    ("prefix_all", [50, 51, 52], 8, 6),
    ("ia3", [60, 61, 62, 63, 64, 65], 3, 9),
]


def test_rows_of_every_method_join_and_leave_as_if_alone(
    adapted: PeftModel, loop: asyncio.AbstractEventLoop
) -> None:
    recorder = Recorder()
    batch = EncoderDecoderBatch(adapted, rules(), PAD, observer=recorder)
    rows, schedule = scheduled(loop, PLAN)
    steps = run(batch, schedule, check_cache)
    check_alone(adapted, rows, PLAN, recorder)
    # all six (five adapters and the base) decoded in one call, rows joined
    # while others were mid-generation and left while others went on
    assert max(len(set(b)) for b in recorder.batches) == 6
    assert any(s["joined"] and any(r.tokens for r in s["running"]) for s in steps)
    assert any(s["left"] and len(s["running"]) > len(s["left"]) for s in steps)
    outputs = {a: r.tokens for r, (a, p, _, _) in zip(rows, PLAN, strict=True) if p == PLAN[0][1]}
    assert outputs["lora"] != alone(adapted, BASE, PLAN[0][1], 9)[0]


def test_static_batches_give_each_row_its_output_alone(
    adapted: PeftModel, loop: asyncio.AbstractEventLoop
) -> None:
    plan = PLAN[:6]
    rows = [make_row(loop, a, p, SamplingParams(max_tokens=n)) for a, p, n, _ in plan]
    generate_batch(adapted, rules(), rows, PAD)
    for row, (adapter, prompt, n, _) in zip(rows, plan, strict=True):
        assert row.tokens == alone(adapted, adapter, prompt, n)[0], (adapter, prompt)
        assert row.finish_reason in ("stop", "length")


def test_decoders_whose_positions_cannot_be_given_per_row_are_refused() -> None:
    from peftlab.serving import Engine

    # BART's decoder positions, taken from a cache length, are renumbered per row; a plain
    # embedding of position ids (which BART's decoder does not call that way) is not
    odd = serve_model("bart")
    odd.model.decoder.embed_positions = nn.Embedding(66, 32)
    model = PeftModel(odd)
    with pytest.raises(
        ValueError, match=r"decoder numbers positions with embed_positions.*--batching static"
    ):
        Engine(model, tokenizer(), base_name="odd-bart", batching="continuous")
    assert Engine(model, tokenizer(), base_name="odd-bart", batching="static").seq2seq
    with pytest.raises(ValueError, match="encoder-decoder"):
        RunningBatch(PeftModel(serve_model("bart")), rules(), PAD)


# ---- through HTTP ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved with the word-level tokenizer (and its chat template), as --model takes it."""
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    serve_model(arch).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_server_answers_completions_and_chat_as_generate_alone(
    batching: str, model_folder: Path, adapter_folders: dict[str, Path], adapted: PeftModel
) -> None:
    from peftlab.serving import load_engine

    engine = load_engine(
        str(model_folder),
        adapters={k: str(v) for k, v in adapter_folders.items()},
        device="cpu",
        batching=batching,
        max_batch_size=8,
    )
    assert engine.seq2seq and engine.batching == batching
    tok = tokenizer()
    prompts = ["w5 w9 w13 w40", "w70 w3", "w11 w12 w13 w14 w15 w16 w17", "w88", "w30 w31 w32"]
    names = [BASE, "lora", "ia3", "bn", "prefix", "prefix_all"]
    calls = [(name, prompts[i % len(prompts)], 4 + i % 5) for i, name in enumerate(names * 2)]
    with serving(engine) as client:
        results = concurrently(
            [
                (lambda n=n, p=p, m=m: client.complete(engine.base_name if n == BASE else n, p, max_tokens=m))
                for n, p, m in calls
            ]
        )
        for (name, prompt, max_tokens), (status, body) in zip(calls, results, strict=True):
            assert status == 200, body
            want = alone(adapted, name, tok(prompt)["input_ids"], max_tokens)[0]
            assert body["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True), (name, prompt)
        assert len({body["choices"][0]["text"] for _, body in results}) >= 6  # the adapters matter
        # chat: the conversation up to the new assistant turn is the encoder's input
        messages = [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "w7 w8 w9"}]
        status, body = client.chat("prefix_all", messages, max_tokens=6)
        assert status == 200, body
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = alone(adapted, "prefix_all", tok(text, add_special_tokens=False)["input_ids"], 6)[0]
        assert body["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)
        # a prompt too long for the server is refused as for a causal LM
        status, body = client.complete("lora", "w5 " * 5000, max_tokens=2)
        assert status == 400


def test_an_encoder_only_model_is_refused_at_start(
    tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tiny_bert), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "encoder-only model" in err and "encoder-decoder (T5, BART)" in err
