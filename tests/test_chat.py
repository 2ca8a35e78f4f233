"""Chat-format data: ``messages`` rows read and checked (bad rows counted and named), rendered
with the tokenizer's chat template with the loss on assistant tokens only (checked token by
token), prompt/completion rows through the template or not (``--chat-template``), fitting that
cuts conversations from the left, and ``peftlab train`` on a chat file end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peftlab import cli
from peftlab.data.files import load_data_file, task_from_files
from peftlab.data.tasks import Example
from peftlab.training.fitting import PromptFormat, example_lengths, fit_examples
from peftlab.training.lm_head import IGNORE_INDEX

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ["system", "user", "assistant", "be", "brief", "hi", "hello", "what", "is", "two", "four",
         "paris", "capital", "of", "france", "yes", "no", "ok", "?", ".", "!", "plus"]  # fmt: skip
SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]


def chat_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="[PAD]",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = template
    return tok


def save_chat_model(path: Path, template: str | None = CHATML) -> Path:
    tok = chat_tokenizer(template)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CONVERSATION = (
    ("system", "be brief ."),
    ("user", "hi"),
    ("assistant", "hello !"),
    ("user", "what is two plus two ?"),
    ("assistant", "four ."),
)


def test_assistant_tokens_alone_are_supervised_token_by_token() -> None:
    tok = chat_tokenizer()
    fmt = PromptFormat.resolve(tok, "auto", chat_rows=True)
    enc = fmt.pieces(Example("x", "four .", messages=CONVERSATION)).encoded()
    # the whole conversation, exactly as the template renders and the tokenizer encodes it
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in CONVERSATION], tokenize=False)
    assert enc.input_ids == tok(rendered.rstrip(), add_special_tokens=False)["input_ids"]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    end = tok.convert_tokens_to_ids("<|im_end|>")
    supervised = [(i, label) for i, label in zip(enc.input_ids, enc.labels, strict=True) if label != -100]
    assert [label for _, label in supervised] == [*ids("hello !"), end, *ids("four ."), end]
    assert all(i == label for i, label in supervised)
    # every label is either -100 or the token itself, position by position
    for position, (token, label) in enumerate(zip(enc.input_ids, enc.labels, strict=True)):
        assert label in (IGNORE_INDEX, token), position
    # generation at evaluation continues the conversation after the last generation prompt
    assert tok.decode(enc.input_ids[: enc.prompt_length]).endswith("<|im_start|> assistant")
    assert enc.input_ids[enc.prompt_length :] == [*ids("four ."), end]
    assert fmt.stop_ids() == [end]


def test_prompt_completion_rows_use_the_template_unless_none() -> None:
    tok = chat_tokenizer()
    example = Example("what is two plus two ?", " four .")
    chat = PromptFormat.resolve(tok, "auto")
    assert chat.chat
    enc = chat.pieces(example).encoded()
    assert (
        tok.decode(enc.input_ids[: enc.prompt_length])
        == "<|im_start|> user what is two plus two ? <|im_end|> <|im_start|> assistant"
    )
    assert [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != -100] == enc.input_ids[
        enc.prompt_length :
    ]
    plain = PromptFormat.resolve(tok, "none").pieces(example).encoded()
    assert tok.decode(plain.input_ids) == "what is two plus two ? four . <|im_end|>"
    # without a template, auto is plain text too
    assert not PromptFormat.resolve(chat_tokenizer(None), "auto").chat


def test_chat_rows_without_a_template_are_an_error_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no chat template.*--chat-template FILE\.jinja"):
        PromptFormat.resolve(chat_tokenizer(None), "auto", chat_rows=True)
    with pytest.raises(ValueError, match="drop --chat-template none"):
        PromptFormat.resolve(chat_tokenizer(), "none", chat_rows=True)
    with pytest.raises(ValueError, match="expected auto, none or a Jinja"):
        PromptFormat.resolve(chat_tokenizer(), str(tmp_path / "missing.jinja"))
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    given = PromptFormat.resolve(chat_tokenizer(None), str(template), chat_rows=True)
    assert given.chat and given.source == str(template)


def test_bad_chat_rows_are_counted_and_named(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows: list[object] = [good] * 40
    rows[3] = {"messages": [{"role": "user", "content": "hi"}]}
    rows[7] = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    rows[9] = {"messages": "hi"}
    rows[11] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    data = load_data_file(path)
    assert data.kind == "chat" and len(data.examples) == 36
    assert data.report.skipped == 4
    assert data.report.problems == [
        f"{path}:4: no assistant turn to learn from (a chat row needs at least one)",
        f"{path}:8: message 1 has unknown role 'bot' (roles: system, user, assistant)",
        f'{path}:10: \'messages\' must be a non-empty list of {{"role", "content"}} objects',
        f"{path}:12: message 2 (assistant) has no text content",
    ]
    assert data.examples[0].messages == (("user", "hi"), ("assistant", "hello"))
    assert data.examples[0].completion == "hello" and data.examples[0].source == f"{path}:1"
    with pytest.raises(ValueError, match=r"4 of 12 rows are bad"):
        load_data_file(_jsonl(tmp_path / "bad.jsonl", rows[:12]))


def test_long_conversations_are_cut_from_the_left_and_measured() -> None:
    tok = chat_tokenizer()
    fmt = PromptFormat.resolve(tok, "auto", chat_rows=True)
    example = Example("x", "four .", messages=CONVERSATION, source="chat.jsonl:1")
    ((context, final),) = example_lengths(tok, [example], fmt)
    full = fmt.pieces(example).encoded()
    assert context + final == len(full.input_ids) and final == 3
    kept, encoded, report = fit_examples(tok, [example], context + final - 4, part="train", fmt=fmt)
    assert report.truncated == 1 and kept == [example]
    cut = encoded[0]
    # the leading <|im_start|> stays, four tokens after it go, labels move with their tokens
    assert cut.input_ids == full.input_ids[:1] + full.input_ids[5:]
    assert cut.labels == full.labels[:1] + full.labels[5:]
    assert cut.input_ids[cut.prompt_length :] == full.input_ids[full.prompt_length :]
    _, _, skipped = fit_examples(tok, [example], 5, part="train", fmt=fmt)
    assert skipped.skipped == 1 and "chat.jsonl:1" in skipped.first_skipped[0]


def test_train_on_chat_jsonl_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_chat_model(tmp_path / "model")
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("hi", "hello !"), ("capital of france ?", "paris ."), ("two plus two ?", "four .")] * 8
    ]
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--data", str(data), "--steps", "3", "--batch-size", "4"]
    argv += ["--num-eval", "4", "--save-every", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    banner = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chat_template"] == "tokenizer"
    assert "exact_match" in metrics["final_eval"] and metrics["final_eval"]["eval_loss"] > 0
    assert task_from_files(data).info["kind"] == "chat"
    # the banner says what the run did: the method, the rows each part kept of the 24, the template
    train, held = metrics["rows"]["train"]["kept"], metrics["rows"]["eval"]["kept"]
    assert train + held == len(rows) and held > 0
    assert f"peftlab train: lora on {model}, task 'chat' ({train} train / {held} eval examples)" in banner
    # LoRA r=8 on q (32 -> 32) and v (32 -> 2 kv heads x 8 = 16) in 2 layers: 2 x 8 x (64 + 48)
    assert metrics["trainable_params"] == 2 * 8 * ((32 + 32) + (32 + 16)) == 1792
    assert f"trainable params: 1,792 || all params: {metrics['total_params']:,}" in banner
    assert "3 steps of 4 examples" in banner
    assert "chat template: the tokenizer's; loss on assistant turns only" in banner
    assert f"train: {train} rows" in banner and f"eval: {held} rows" in banner
    # the same file on a model without a template: one line naming the fix, before the weights load
    bare = save_chat_model(tmp_path / "bare", template=None)
    argv = ["train", "--model", str(bare), "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o2")]
    assert cli.main(argv) == 2
    assert "--chat-template FILE.jinja" in capsys.readouterr().err


def test_the_example_chat_file_reads() -> None:
    path = Path(__file__).parent.parent / "examples" / "chat.jsonl"
    data = load_data_file(path)
    assert data.kind == "chat" and data.report.skipped == 0
    assert any(sum(role == "assistant" for role, _ in ex.messages or ()) > 1 for ex in data.examples)


def test_compare_on_chat_rows_in_bf16(tmp_path: Path) -> None:
    model = save_chat_model(tmp_path / "model")
    pairs = [
        ("hi", "hello !"),
        ("capital of france ?", "paris ."),
        ("two plus two ?", "four ."),
        ("ok ?", "yes ."),
    ]
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief ."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
        }
        for q, a in pairs * 12
    ]
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    argv = ["compare", "--model", str(model), "--data", str(data), "--quick", "--threads", "1", "--methods"]
    argv += ["lora,full", "--dtype", "bfloat16", "--out", str(out)]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["device"] == "cpu" and results["settings"]["dtype"] == "bfloat16"
    assert results["task"]["data"]["kind"] == "chat"
    for row in results["methods"]:
        assert "exact_match" in row["metrics"] and row["runs"][0]["peak_gpu_memory_bytes"] is None
