"""``peftlab serve`` on encoder-decoders: a tiny T5 (relative positions) and a tiny BART (learned
positions) built from configs, with adapters of every method moved away from identity.

Continuous batching (T5): rows of every method join and leave a running batch at different
steps, each keeping its own encoder output and cache rows, and every row's tokens and logits
are those of ``generate`` with its adapter alone. Static batching (T5 and BART) gives the same.
Through HTTP the server answers completions and chat the same way; an encoder-only model is
refused at start in one line.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from peftlab import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    TaskType,
    get_peft_model,
)
from peftlab.cli import main
from peftlab.serving.continuous import RunningBatch
from peftlab.serving.decoding import StopRules
from peftlab.serving.encoder_decoder import EncoderDecoderBatch
from peftlab.serving.jobs import Job, Row, SamplingParams
from peftlab.serving.static import generate_batch
from serve_helpers import EOS, PAD, concurrently, serving, tokenizer
from suite_helpers import perturb

BASE = "__base__"
VOCAB = 96


def build(arch: str) -> torch.nn.Module:
    """A tiny T5 or BART whose special tokens are the serve tokenizer's (pad 0, eos 2)."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model: torch.nn.Module
    if arch == "t5":
        model = T5ForConditionalGeneration(
            T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
        )  # fmt: skip
    else:
        model = BartForConditionalGeneration(
            BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
                       eos_token_id=EOS, decoder_start_token_id=EOS, forced_eos_token_id=None)
        )  # fmt: skip
    return model.eval()


def configs() -> dict[str, PeftConfig]:
    """One config per method (two for prefix tuning: HF PEFT's layout, on decoder self-attention,
    and one in the encoder and cross-attention too)."""
    seq2seq = TaskType.SEQ_2_SEQ_LM
    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        "ia3": IA3Config(init_ia3_weights=False),
        "bn": BottleneckConfig(reduction_factor=4, non_linearity="gelu"),
        "prefix": PrefixTuningConfig(task_type=seq2seq, num_virtual_tokens=3),
        "prefix_all": PrefixTuningConfig(
            task_type=seq2seq, num_virtual_tokens=2, encoder_prefix=True, cross_prefix=True
        ),
    }


def save_adapters(root: Path, arch: str) -> dict[str, Path]:
    """Each adapter moved clearly away from identity (LoRA B, IA³ scales, the bottleneck's
    up-projection, the prefixes all changed), saved in its own folder."""
    folders = {}
    for seed, (name, config) in enumerate(configs().items()):
        model = get_peft_model(build(arch), config)
        perturb(model.adapter_parameters("default").values(), seed=seed, scale=0.3)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def loaded(arch: str, folders: dict[str, Path]) -> PeftModel:
    model = PeftModel(build(arch))
    for name, folder in folders.items():
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_adapters(tmp_path_factory.mktemp("t5-adapters"), "t5")


@pytest.fixture(scope="module")
def t5(t5_folders: dict[str, Path]) -> PeftModel:
    return loaded("t5", t5_folders)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Jobs need a loop for their futures; nothing runs on it here."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def alone(
    model: PeftModel, adapter: str, ids: list[int], max_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy ``generate`` of one prompt with one adapter set the ordinary way: the new decoder
    tokens (up to eos) and the logits of every step."""
    x = torch.tensor([ids])
    kw: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": False, "eos_token_id": EOS}
    kw |= {"pad_token_id": PAD, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        if adapter == BASE:
            with model.disable_adapter():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    new = out.sequences[0, 1:].tolist()  # after the decoder start token
    if EOS in new:
        new = new[: new.index(EOS)]
    return new, [step[0] for step in out.logits]


class Recorder:
    """Every row's next-token logits, call by call (the batch's observer)."""

    def __init__(self) -> None:
        self.logits: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.batches: list[list[str]] = []

    def __call__(self, rows: Sequence[Row], logits: torch.Tensor) -> None:
        self.batches.append([r.adapter for r in rows])
        for row, line in zip(rows, logits, strict=True):
            self.logits[id(row)].append(line.clone())


def make_row(loop: asyncio.AbstractEventLoop, adapter: str, prompt: list[int], params: SamplingParams) -> Row:
    job = Job(loop, stream=False, model=adapter)
    row = Row(adapter, prompt, params, job, 0)
    job.rows.append(row)
    return row


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


def run(batch: EncoderDecoderBatch, schedule: dict[int, list[Row]]) -> list[dict[str, Any]]:
    """Step until every scheduled row is done; ``schedule[step]`` joins before that step."""
    steps = []
    step = 0
    while step <= max(schedule) or batch.rows:
        before = list(batch.rows)
        report = batch.step(schedule.get(step, []))
        check_cache(batch)
        steps.append({"running": before, "joined": schedule.get(step, []), "left": report.left})
        step += 1
        assert step < 200
    return steps


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


def test_t5_rows_of_every_method_join_and_leave_as_if_alone(
    t5: PeftModel, loop: asyncio.AbstractEventLoop
) -> None:
    recorder = Recorder()
    batch = EncoderDecoderBatch(t5, StopRules(tokenizer(), {EOS}, lambda r, c: None), PAD, observer=recorder)
    rows = [make_row(loop, a, p, SamplingParams(max_tokens=n)) for a, p, n, _ in PLAN]
    schedule: dict[int, list[Row]] = defaultdict(list)
    for row, (_, _, _, at) in zip(rows, PLAN, strict=True):
        schedule[at].append(row)
    steps = run(batch, dict(schedule))

    for row, (adapter, prompt, n, _) in zip(rows, PLAN, strict=True):
        want_tokens, want_logits = alone(t5, adapter, prompt, n)
        assert row.tokens == want_tokens, (adapter, prompt)
        got = recorder.logits[id(row)]
        assert len(got) == len(want_logits)
        for g, w in zip(got, want_logits, strict=True):
            torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=0)
        assert row.finish_reason in ("stop", "length")
    assert max(len({r.adapter for r in s["running"]}) for s in steps) == 6  # five adapters and the base
    assert any(s["joined"] and any(r.tokens for r in s["running"]) for s in steps)
    assert any(s["left"] and len(s["running"]) > len(s["left"]) for s in steps)
    outputs = {a: r.tokens for r, (a, p, _, _) in zip(rows, PLAN, strict=True) if p == PLAN[0][1]}
    assert outputs["lora"] != alone(t5, BASE, PLAN[0][1], 9)[0]


def static_rows(loop: asyncio.AbstractEventLoop) -> list[tuple[Row, str, list[int], int]]:
    plan = [(a, p, n) for a, p, n, _ in PLAN[:6]]
    return [(make_row(loop, a, p, SamplingParams(max_tokens=n)), a, p, n) for a, p, n in plan]


def test_t5_static_batches_give_each_row_its_output_alone(
    t5: PeftModel, loop: asyncio.AbstractEventLoop
) -> None:
    rows = static_rows(loop)
    generate_batch(t5, StopRules(tokenizer(), {EOS}, lambda r, c: None), [r for r, *_ in rows], PAD)
    for row, adapter, prompt, n in rows:
        assert row.tokens == alone(t5, adapter, prompt, n)[0], (adapter, prompt)
        assert row.finish_reason in ("stop", "length")


def test_bart_serves_with_static_batching_and_refuses_continuous(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    from peftlab.serving import Engine

    bart = loaded("bart", save_adapters(tmp_path, "bart"))
    rows = static_rows(loop)
    generate_batch(bart, StopRules(tokenizer(), {EOS}, lambda r, c: None), [r for r, *_ in rows], PAD)
    for row, adapter, prompt, n in rows:
        assert row.tokens == alone(bart, adapter, prompt, n)[0], (adapter, prompt)
    # its decoder numbers positions from the cache length: a row that joined later would be
    # misplaced, so continuous batching says why and what to use instead
    with pytest.raises(ValueError, match=r"decoder numbers positions.*--batching static"):
        Engine(bart, tokenizer(), base_name="tiny-bart", batching="continuous")
    assert Engine(bart, tokenizer(), base_name="tiny-bart", batching="static").seq2seq
    with pytest.raises(ValueError, match="encoder-decoder"):
        RunningBatch(bart, StopRules(tokenizer(), {EOS}, lambda r, c: None), PAD)


# ---- through HTTP ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny T5 saved with the word-level tokenizer (and its chat template), as --model takes it."""
    path = tmp_path_factory.mktemp("tiny-t5")
    build("t5").save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_server_answers_t5_completions_and_chat_as_generate_alone(
    batching: str, t5_folder: Path, t5_folders: dict[str, Path], t5: PeftModel
) -> None:
    from peftlab.serving import load_engine

    engine = load_engine(
        str(t5_folder),
        adapters={k: str(v) for k, v in t5_folders.items()},
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
            want = alone(t5, name, tok(prompt)["input_ids"], max_tokens)[0]
            assert body["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True), (name, prompt)
        assert len({body["choices"][0]["text"] for _, body in results}) >= 6  # the adapters matter
        # chat: the conversation up to the new assistant turn is the encoder's input
        messages = [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "w7 w8 w9"}]
        status, body = client.chat("prefix_all", messages, max_tokens=6)
        assert status == 200, body
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = alone(t5, "prefix_all", tok(text, add_special_tokens=False)["input_ids"], 6)[0]
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
