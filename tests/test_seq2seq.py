"""Encoder-decoder models (T5, BART) in the applications: the third model kind, rows as encoder
input and decoder targets, ``peftlab train`` with every method and ``peftlab compare --quick``
with every method row filled, on tiny models built from configs with a word-level tokenizer;
PEFT interop of what ``train`` saves on T5, both ways."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSeq2SeqLM

from conftest import WORDS, build_model, sentiment_texts, word_tokenizer
from peftlab import PeftModel
from peftlab.cli import main
from peftlab.data.tasks import Example
from peftlab.models import load_language_model, model_kind
from peftlab.training.encoding import Encoded, collate, num_targets
from peftlab.training.fitting import PromptFormat, fit_examples
from peftlab.training.lm_head import IGNORE_INDEX, supervised_loss_sum

SPECIALS = ["<pad>", "</s>", "<unk>"]


def _save_tiny(path: Path, arch: str) -> Path:
    """The tiny T5 or BART of conftest over the sentiment words, eos ``</s>`` (id 1), saved with
    its tokenizer."""
    words = SPECIALS + WORDS
    word_tokenizer(words, eos_token="</s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    fields: dict[str, Any] = {"vocab_size": len(words), "eos_token_id": 1}
    if arch == "bart":
        fields |= {"max_position_embeddings": 128, "decoder_start_token_id": 1}
    build_model(arch, **fields).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("t5"), "t5")


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("bart"), "bart")


def _generation_data(path: Path, n: int = 48) -> Path:
    words = WORDS[:8]
    rows = [{"prompt": f"q {w} x", "completion": f"ans {w}"} for w in (words * n)[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _classification_data(path: Path, n: int = 48) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in sentiment_texts(n)))
    return path


# ---- the model kind ---------------------------------------------------------------------------


def test_model_kind_reads_is_encoder_decoder(tiny_t5: Path, tiny_bart: Path, tiny_llama: Path) -> None:
    assert model_kind(str(tiny_t5)) == "seq2seq"
    assert model_kind(str(tiny_bart)) == "seq2seq"
    assert model_kind(str(tiny_llama)) == "causal"
    model, tok = load_language_model(str(tiny_t5), kind="seq2seq")
    assert type(model).__name__ == "T5ForConditionalGeneration" and tok.pad_token == "<pad>"


# ---- rows and the loss -------------------------------------------------------------------------


def test_rows_become_encoder_input_and_decoder_targets(tiny_t5: Path) -> None:
    model, tok = load_language_model(str(tiny_t5), kind="seq2seq")
    fmt = PromptFormat.resolve(tok, "none", seq2seq=True)
    examples = [Example("q good x", "ans good"), Example("q the film was bad", "ans bad")]
    _, encoded, report = fit_examples(tok, examples, 64, part="train", fmt=fmt)
    ids = tok.convert_tokens_to_ids
    # the prompt is the encoder's input, the completion + eos the decoder's targets, all learned
    assert encoded[0] == Encoded(ids(["q", "good", "x"]), [*ids(["ans", "good"]), 1], seq2seq=True)
    assert encoded[0].prompt_ids == ids(["q", "good", "x"]) and num_targets(encoded[0]) == 3
    batch = collate(encoded, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [*ids(["q", "good", "x"]), 0, 0],
        ids(["q", "the", "film", "was", "bad"]),
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[*ids(["ans", "good"]), 1], [*ids(["ans", "bad"]), 1]]

    # too long: the completion is kept whole and the prompt cut from the left, as for causal LMs
    long = Example("q " + "the film was bad " * 3 + "x", "ans bad")
    _, [cut], report = fit_examples(tok, [long], 9, part="train", fmt=fmt)
    assert cut.input_ids == ids(["bad", "the", "film", "was", "bad", "x"])
    assert cut.labels == [*ids(["ans", "bad"]), 1]
    assert report.truncated == 1

    # the loss by hand: decoder input = targets shifted right behind decoder_start (0), the
    # cross-entropy of each target at its own position, padding (-100) left out
    labels = batch.pop("labels")
    labels[0, 2] = IGNORE_INDEX  # mask one target: it must not count
    summed = supervised_loss_sum(model, model, dict(batch), labels)
    decoder_in = torch.tensor([[0, ids("ans"), ids("good")], [0, ids("ans"), ids("bad")]])
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=decoder_in).logits
    expected = sum(
        F.cross_entropy(logits[i, j], labels[i, j], reduction="sum")
        for i in range(2)
        for j in range(3)
        if labels[i, j] != IGNORE_INDEX
    )
    torch.testing.assert_close(summed.detach(), expected, rtol=1e-5, atol=1e-5)
    # and transformers' own loss (labels given) agrees on the unmasked rows' mean
    with torch.no_grad():
        theirs = model(**batch, labels=labels).loss
    torch.testing.assert_close(summed.detach() / 5, theirs, rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_one_line_error(
    tiny_t5: Path, tiny_bert: Path, tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tok = load_language_model(str(tiny_t5), kind="seq2seq")
    with pytest.raises(ValueError, match=r"has no chat template.*--chat-template FILE\.jinja"):
        PromptFormat.resolve(tok, "auto", chat_rows=True, seq2seq=True)
    fmt = PromptFormat.resolve(tok, "none", seq2seq=True)
    with pytest.raises(ValueError, match="learns the completion as its decoder's targets"):
        fmt.pieces(Example("q good x", ""))
    data = _generation_data(tmp_path / "d.jsonl")
    assert main(["train", "--model", str(tiny_bert), "--data", str(data), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert "an encoder-only model cannot generate" in err and "\n" not in err
    # the encoder-decoder-only preset on a causal LM: refused before the weights load
    args = ["--model", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "o2")]
    assert main(["train", *args, "--method", "prefix-all"]) != 0
    assert "--method prefix-all is for seq2seq models" in capsys.readouterr().err
    assert main(["compare", "--quick", *args, "--methods", "lora,prefix-all"]) != 0
    assert "prefix-all applies to seq2seq models only" in capsys.readouterr().err


# ---- peftlab train ----------------------------------------------------------------------------
METHODS = ("lora", "ia3", "bottleneck", "prefix", "prefix-all", "full")


def _decoder_logits(model: torch.nn.Module, tok: Any) -> torch.Tensor:
    enc = tok(["q good x", "the film was bad"], return_tensors="pt", padding=True)
    decoder = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    model.eval()
    with torch.no_grad():
        return model(**enc, decoder_input_ids=decoder).logits


def _train(model: Path, data: Path, out: Path, method: str, *extra: str) -> dict[str, Any]:
    options = {"bottleneck": ["--bottleneck-size", "4"], "prefix": ["--num-virtual-tokens", "3"]}
    args = [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--method",
        method,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--num-eval",
        "4",
        "--save-every",
        "2",
        "--out",
        str(out),
        *options.get(method, []),
        *extra,
    ]
    assert main(args) == 0
    return dict(json.loads((out / "metrics.json").read_text()))


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("method", METHODS)
def test_train_every_method_saves_what_loads_back(
    arch: str, method: str, tiny_t5: Path, tiny_bart: Path, tmp_path: Path
) -> None:
    folder = tiny_t5 if arch == "t5" else tiny_bart
    data = _generation_data(tmp_path / "d.jsonl")
    metrics = _train(folder, data, tmp_path / "out", method)
    assert metrics["model_kind"] == "seq2seq" and len(metrics["history"]["losses"]) == 4
    assert {"eval_loss", "exact_match"} <= set(metrics["final_eval"])
    _, tok = load_language_model(str(folder), kind="seq2seq")
    out = tmp_path / "out"
    if method == "full":
        loaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_2_SEQ_LM"
        assert (
            config.get("encoder_prefix", False)
            == config.get("cross_prefix", False)
            == (method == "prefix-all")
        )
        loaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(folder), out)
        # the last checkpoint (step 4) holds the same adapter
        again = PeftModel.from_pretrained(
            AutoModelForSeq2SeqLM.from_pretrained(folder), out / "checkpoints" / "step-4" / "adapter"
        )
        torch.testing.assert_close(_decoder_logits(again, tok), _decoder_logits(loaded, tok), rtol=0, atol=0)
    base = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert not torch.allclose(_decoder_logits(base, tok), _decoder_logits(loaded, tok), atol=1e-4)


def test_train_resumes_exactly_in_mixed_precision_with_tracking(tiny_t5: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = _generation_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    extra = ("--dtype", "bfloat16", "--report-to", "tensorboard", "--target-modules", "all-linear")
    first = _train(tiny_t5, data, out, "lora", *extra)
    assert first["precision"]["dtype"] == "bfloat16" and (out / "tensorboard").is_dir()
    final = load_file(out / "adapter_model.safetensors")
    # lose the last checkpoint and the outputs: --resume goes on from step 2 to the same adapter
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "adapter_model.safetensors").unlink()
    resumed = _train(tiny_t5, data, out, "lora", *extra, "--resume")
    again = load_file(out / "adapter_model.safetensors")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    assert resumed["history"]["losses"] == first["history"]["losses"]


# ---- peftlab compare --quick ------------------------------------------------------------------


def _compare(out: Path, *args: str) -> dict[str, Any]:
    assert main(["compare", "--quick", "--threads", "1", "--out", str(out), *args]) == 0
    return dict(json.loads((out / "results.json").read_text()))


@pytest.mark.parametrize(("arch", "kind"), [("t5", "generation"), ("bart", "classification")])
def test_compare_quick_fills_every_method_row(
    arch: str, kind: str, tiny_t5: Path, tiny_bart: Path, tmp_path: Path
) -> None:
    folder = tiny_t5 if arch == "t5" else tiny_bart
    if kind == "generation":
        data = _generation_data(tmp_path / "d.jsonl", 64)
    else:
        data = _classification_data(tmp_path / "d.jsonl", 64)
    results = _compare(tmp_path / "out", "--model", str(folder), "--data", str(data))
    assert results["model_kind"] == "seq2seq"
    run_kind = "generation" if kind == "generation" else "causal-classification"
    assert results["settings"]["run_kind"] == run_kind
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["full", "lora", "lora-all", "bottleneck", "prefix", "prefix-all", "ia3"]
    expected = {"exact_match", "token_f1", "rouge_l"} if kind == "generation" else {"accuracy", "macro_f1"}
    for name, row in rows.items():
        metrics = row["runs"][0]["metrics"]
        assert expected | {"eval_loss", "perplexity"} <= set(metrics), name
        assert row["trainable_params"] > 0 and row["inference_overhead_unmerged"] > 0, name
        assert row["quality"]["mean"] is not None, name
    # the two prefix layouts: PEFT's (decoder self-attention) and the paper's (encoder, decoder, cross)
    assert rows["prefix-all"]["trainable_params"] > rows["prefix"]["trainable_params"]
    assert rows["prefix"]["config"]["task_type"] == "SEQ_2_SEQ_LM"
    assert rows["prefix-all"]["config"]["encoder_prefix"] and rows["prefix-all"]["config"]["cross_prefix"]
    # forgetting: each passage read by the encoder and scored reconstructing it through the decoder
    assert results["zero_shot"]["forgetting"]["value"] == 0.0
    assert all(row["forgetting"]["measure"].startswith("change in mean token loss") for row in rows.values())
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Prefix tuning (enc+dec+cross)" in report and "latency of greedy generation" in report


# ---- HF PEFT interop on T5, both ways ---------------------------------------------------------


@pytest.mark.parametrize("method", ["prefix", "lora", "ia3"])
def test_what_train_saves_on_t5_runs_the_same_in_peft(method: str, tiny_t5: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    data = _generation_data(tmp_path / "d.jsonl")
    _train(tiny_t5, data, tmp_path / "out", method)
    _, tok = load_language_model(str(tiny_t5), kind="seq2seq")
    ours = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), tmp_path / "out")
    expected = _decoder_logits(ours, tok)
    assert not torch.allclose(_decoder_logits(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), tok), expected)
    torch.testing.assert_close(_decoder_logits(theirs, tok), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "lora", "ia3"])
def test_what_peft_saves_on_t5_runs_the_same_in_peftlab(method: str, tiny_t5: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    configs = {
        "prefix": lambda: peft.PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, prefix_projection=True
        ),
        "lora": lambda: peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8),
        "ia3": lambda: peft.IA3Config(task_type="SEQ_2_SEQ_LM"),
    }
    torch.manual_seed(3)
    theirs = peft.get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), configs[method]())
    with torch.no_grad():  # away from identity (LoRA's B and IA3's vectors start at it)
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    _, tok = load_language_model(str(tiny_t5), kind="seq2seq")
    ours = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), tmp_path / "peft")
    expected = _decoder_logits(theirs, tok)
    assert not torch.allclose(_decoder_logits(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), tok), expected)
    torch.testing.assert_close(_decoder_logits(ours, tok), expected, rtol=0, atol=1e-5)


# ---- count and recommend agree with the kind --------------------------------------------------


def test_count_and_recommend_know_encoder_decoders(
    tiny_t5: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peftlab.count import count_methods, load_preset

    t5 = count_methods(load_preset("t5-base"))
    assert t5.model_kind == "seq2seq" and "a seq2seq model" in t5.render()
    rows = {r.label: r for r in t5.rows}
    assert rows["Prefix tuning (enc+dec+cross)"].error is None
    assert rows["Prefix tuning (enc+dec+cross)"].trainable > rows["Prefix tuning"].trainable
    llama = count_methods(load_preset("llama-2-7b"))
    assert llama.model_kind == "causal" and "Prefix tuning (enc+dec+cross)" not in {
        r.label for r in llama.rows
    }

    assert main(["recommend", "--model", str(tiny_t5), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["method"] == "prefix" and "prefix-all" in rec["candidates"]
    assert main(["recommend", "--model", str(tiny_llama), "--model-type", "seq2seq"]) != 0
    assert (
        "the model kinds disagree (--model-type says seq2seq, --model says causal)" in capsys.readouterr().err
    )


def test_label_words_are_scored_through_the_decoder(tiny_bart: Path) -> None:
    from peftlab.training.classify import score_label_words

    model, tok = load_language_model(str(tiny_bart), kind="seq2seq")
    fmt = PromptFormat.resolve(tok, "none", seq2seq=True)
    examples = [Example("text : the film was good label", "pos"), Example("text : a plot label", "neg")]
    _, encoded, _ = fit_examples(tok, examples, 64, part="test", fmt=fmt)
    labels = ("neg", "pos", "good bad")  # a two-token label too
    predictions, loss = score_label_words(model, tok, encoded, labels, pad_token_id=0)
    # by hand: each label's tokens as the decoder's targets after the encoder read the prompt
    expected = []
    for e in encoded:
        scores = []
        for label in labels:
            target = tok(" " + label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([target])).logits
            scores.append(float(logits[0].log_softmax(-1).gather(1, torch.tensor(target)[:, None]).sum()))
        expected.append(max(range(len(labels)), key=lambda i: scores[i]))
    assert predictions == expected
    with torch.no_grad():
        reference = [
            model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
            for e in encoded
        ]
    # the loss is the token mean over both examples' reference targets (each 2 tokens: label, eos)
    assert loss == pytest.approx(float(sum(reference)) / 2, rel=1e-5)
