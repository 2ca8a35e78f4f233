"""Classification per model kind and ``compare --quick --data`` end to end, on tiny models saved
with their own tiny tokenizers (offline, seconds): a BERT encoder gets a classification head, a
Llama causal LM is scored by label words or, on prompt/completion data, by generation metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from conftest import WORDS, sentiment_texts
from peftlab.cli import main
from peftlab.data.files import classification_prompt
from peftlab.data.tasks import Example
from peftlab.training.classify import (
    ClassifierAsNextToken,
    _score_continuations,
    classify,
    encode_texts,
    score_label_words,
)
from peftlab.training.encoding import encode_examples, pad_id
from peftlab.training.evaluation import evaluate_loss
from peftlab.training.loop import TrainConfig, TrainLoop


def _load(path: Path, cls_name: str, **kwargs: Any) -> tuple[Any, Any]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = getattr(transformers, cls_name).from_pretrained(path, **kwargs)
    return model, tok


def _examples(n: int, labels: tuple[str, ...] = ("neg", "pos")) -> list[Example]:
    return [
        Example(classification_prompt(t, labels), " " + lab, text=t, label=lab)
        for t, lab in sentiment_texts(n)
    ]


# ---- units --------------------------------------------------------------------------------


def test_classification_head_learns_through_the_shared_loop(tiny_bert: Path) -> None:
    from peftlab import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    base, tok = _load(tiny_bert, "AutoModelForSequenceClassification", num_labels=2)
    labels = ("neg", "pos")
    train = encode_texts(tok, _examples(24), labels, max_length=16)
    assert [e.labels[1] for e in train[:2]] == [1, 0] and train[0].labels.count(-100) == len(
        train[0].labels
    ) - 1
    evals = encode_texts(tok, _examples(12)[::-1], labels, max_length=16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type=TaskType.SEQ_CLS))
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert head, "SEQ_CLS must make the new head trainable"
    before, loss_before = classify(model, evals, pad_id(tok))
    loop = TrainLoop(model, train, TrainConfig(steps=60, batch_size=8, learning_rate=1e-2), pad_token_id=0,
                     forward_module=ClassifierAsNextToken(model))  # fmt: skip
    history = loop.run(progress=False)
    predicted, loss_after = classify(model, evals, pad_id(tok))
    truth = [e.labels[1] for e in evals]
    assert sum(p == t for p, t in zip(before, truth, strict=True)) < 12  # not solved by chance
    assert predicted == truth
    assert loss_after < loss_before and history.losses[-1] < history.losses[0]
    # the loop's loss is the classifier's cross-entropy on the batch
    ids = torch.tensor([train[0].input_ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1]))
    _, single = classify(model, train[:1], 0)
    assert single == pytest.approx(float(direct), abs=1e-5)


def test_label_word_scoring_matches_full_continuation_scores(tiny_llama: Path) -> None:
    model, tok = _load(tiny_llama, "AutoModelForCausalLM")
    labels = ("neg", "pos")
    encoded = encode_examples(tok, _examples(6), 32)
    predicted, loss = score_label_words(model, tok, encoded, labels, pad_token_id=0, batch_size=4)
    # the one-forward fast path (single-token labels) picks what scoring every continuation picks
    heads = [e.prompt_ids for e in encoded]
    slow = _score_continuations(model, heads, [[tok.convert_tokens_to_ids(w)] for w in labels], 0)
    assert predicted == slow.argmax(-1).tolist()
    # and its loss is the mean over label + eos tokens, as training's evaluate_loss computes it
    expected = evaluate_loss(model, encoded, pad_token_id=0)
    assert loss == pytest.approx(expected, rel=1e-5)
    # multi-token labels take the slow path and still return one label index per example
    multi_labels = ("a x", "pos")
    multi_encoded = encode_examples(tok, _examples(4, multi_labels), 32)
    multi, _ = score_label_words(model, tok, multi_encoded, multi_labels, pad_token_id=0)
    assert len(multi) == 4 and set(multi) <= {0, 1}


# ---- compare --quick --data ----------------------------------------------------------


def _write_classification(path: Path, n: int = 40) -> Path:
    rows = [json.dumps({"text": t, "label": lab}) for t, lab in sentiment_texts(n)]
    rows[7] = "{broken"  # counted and skipped: 1 of 40 is under the bad-row limit
    path.write_text("\n".join(rows) + "\n")
    return path


def _compare(tmp_path: Path, *args: str) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "out"
    assert main(["compare", "--quick", "--threads", "1", "--out", str(out), *args]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_compare_quick_data_encoder(tiny_bert: Path, tmp_path: Path) -> None:
    data = _write_classification(tmp_path / "reviews.jsonl")
    out, results = _compare(tmp_path, "--model", str(tiny_bert), "--data", str(data), "--seeds", "2")
    assert results["model_kind"] == "encoder"
    assert results["settings"]["run_kind"] == "encoder-classification"
    assert results["task"]["labels"] == ["neg", "pos"]
    info = results["task"]["data"]
    assert info["skipped_rows"] == 1 and info["rows"][0]["first_problems"][0].startswith(
        f"{data}:8: not valid JSON"
    )
    by_name = {r["method"]: r for r in results["methods"]}
    assert list(by_name) == ["full", "lora", "lora-all", "bottleneck", "prefix", "ia3"]
    for row in results["methods"]:
        assert set(row["metrics"]) == {"accuracy", "macro_f1", "eval_loss"}
        assert row["quality"]["n"] == 2 and row["quality"]["mean"] == row["metrics"]["accuracy"]["mean"]
    assert by_name["full"]["trainable_params"] == by_name["full"]["total_params"]
    # every adapter saves the new classification head (modules_to_save), beside its own weights
    for name in ("lora", "bottleneck", "prefix", "ia3"):
        with safe_open(str(out / "adapters" / name / "adapter_model.safetensors"), "pt") as f:
            assert any("classifier" in k for k in f.keys()), name  # noqa: SIM118
    report = (out / "report.md").read_text()
    assert "Quality (accuracy, 95% CI)" in report and "macro_f1" in report
    assert "1 skipped (first: " in report and "not valid JSON" in report
    assert "Labels in eval: neg " in report


def test_compare_quick_data_causal_classification_and_generation(tiny_llama: Path, tmp_path: Path) -> None:
    data = _write_classification(tmp_path / "reviews.jsonl")
    _, results = _compare(tmp_path / "cls", "--model", str(tiny_llama), "--data", str(data),
                          "--methods", "lora,prefix", "--metric", "macro_f1")  # fmt: skip
    assert results["settings"]["run_kind"] == "causal-classification"
    assert results["task"]["metric"] == "macro_f1"
    for row in results["methods"]:
        metrics = row["runs"][0]["metrics"]
        assert set(metrics) == {"accuracy", "macro_f1", "eval_loss", "perplexity"}
        assert row["quality"]["mean"] == metrics["macro_f1"]
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))

    gen = tmp_path / "qa.jsonl"
    rows = [json.dumps({"prompt": f"q {w} :", "completion": f" ans {w}"}) for w in WORDS[:6] * 4]
    rows.insert(3, json.dumps({"prompt": "q x :"}))  # line 4 lacks its completion
    gen.write_text("\n".join(rows) + "\n")
    out, results = _compare(tmp_path / "gen", "--model", str(tiny_llama), "--data", str(gen),
                            "--methods", "lora,ia3", "--metric", "rouge_l")  # fmt: skip
    assert results["settings"]["run_kind"] == "generation"
    for row in results["methods"]:
        metrics = row["runs"][0]["metrics"]
        assert {"exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity"} <= set(metrics)
        assert row["quality"]["mean"] == metrics["rouge_l"]
    assert results["task"]["data"]["rows"][0]["first_problems"] == [
        f"{gen}:4: missing field 'completion' (every row needs prompt and completion as non-empty text)"
    ]
    assert "token_f1" in (out / "report.md").read_text()


def test_compare_rejects_encoder_on_generation_data_and_unknown_metric(
    tiny_bert: Path, tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = tmp_path / "qa.jsonl"
    gen.write_text("\n".join(json.dumps({"prompt": f"q {i}", "completion": " a"}) for i in range(10)))
    assert (
        main(["compare", "--quick", "--model", str(tiny_bert), "--data", str(gen), "--out", str(tmp_path)])
        == 2
    )
    assert "needs text/label data" in capsys.readouterr().err
    data = _write_classification(tmp_path / "reviews.jsonl")
    args = ["compare", "--quick", "--model", str(tiny_llama), "--data", str(data), "--metric", "bleu"]
    assert main([*args, "--out", str(tmp_path / "o"), "--methods", "lora"]) == 2
    assert "--metric 'bleu': this run measures accuracy, macro_f1" in capsys.readouterr().err
