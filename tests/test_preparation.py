"""One run preparation for ``peftlab train`` and ``peftlab compare``: a bad row is skipped,
counted and named with its file and line by both, in the same words; rows too long and rows
unreadable are counted apart where it matters (the lost-rows limit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import WORDS
from peftlab.cli import main
from peftlab.training.fitting import COVERAGE, FitReport, LengthPlan, check_lost
from peftlab.training.preparation import data_fingerprint

GOOD_ROWS = 40


def _prompt_rows() -> list[dict[str, str]]:
    return [
        {"prompt": f"q {WORDS[i % 6]} {WORDS[(i // 6) % 6]} :", "completion": f" ans {WORDS[i % 6]}"}
        for i in range(GOOD_ROWS)
    ]


def _jsonl_missing_completion(path: Path) -> tuple[Path, str]:
    rows = [json.dumps(r) for r in _prompt_rows()]
    rows.insert(3, json.dumps({"prompt": "q good :"}))  # line 4
    path.write_text("\n".join(rows) + "\n")
    return path, f"{path}:4: missing field 'completion'"


def _csv_stray_column(path: Path) -> tuple[Path, str]:
    lines = ["prompt,completion", *(f"{r['prompt']},{r['completion']}" for r in _prompt_rows())]
    lines.insert(6, "q bad :, ans bad,stray")  # line 7
    path.write_text("\n".join(lines) + "\n")
    return path, f"{path}:7: 3 cells for 2 columns"


def _chat_with_a_wizard(path: Path) -> tuple[Path, str]:
    rows = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in _prompt_rows()
    ]
    rows.insert(
        1, {"messages": [{"role": "wizard", "content": "q x :"}, {"role": "assistant", "content": "x"}]}
    )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, f"{path}:2: "


def _train(model: Path, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "1", "--batch-size", "4",
            "--save-every", "0", "--num-eval", "0", "--out", str(out), *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("make", [_jsonl_missing_completion, _csv_stray_column, _chat_with_a_wizard])
def test_train_counts_and_names_a_bad_row(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any
) -> None:
    suffix = ".csv" if make is _csv_stray_column else ".jsonl"
    data, reason = make(tmp_path / f"data{suffix}")
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' <eos> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}"
    )
    extra = ("--chat-template", str(template)) if make is _chat_with_a_wizard else ()
    metrics = _train(tiny_llama, data, tmp_path / "run", *extra)
    train = metrics["rows"]["train"]
    assert (train["skipped"], train["unreadable"]) == (1, 1)
    assert train["first_skipped"][0].startswith(reason)
    assert train["rows"] == train["kept"] + 1  # the bad row counts among the file's rows
    assert metrics["rows"]["eval"]["skipped"] == 0  # carved from the good rows only
    captured = capsys.readouterr()
    banner = captured.out + captured.err
    assert "1 skipped (skipped: " + reason in banner


def test_train_and_compare_report_the_same_bad_row(tiny_llama: Path, tmp_path: Path) -> None:
    data, reason = _jsonl_missing_completion(tmp_path / "data.jsonl")
    trained = _train(tiny_llama, data, tmp_path / "run")["rows"]["train"]
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--model", str(tiny_llama), "--data", str(data), "--methods", "lora"]
    assert main([*args, "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    compared = results["task"]["rows"]["train"]
    assert (
        (compared["skipped"], compared["unreadable"]) == (trained["skipped"], trained["unreadable"]) == (1, 1)
    )
    assert compared["first_skipped"] == trained["first_skipped"]
    assert results["task"]["data"]["rows"][0]["first_problems"] == [
        reason + " (every row needs prompt and completion as non-empty text)"
    ]
    assert "1 skipped (first: " + reason in (out / "report.md").read_text()


def test_unreadable_rows_do_not_count_against_the_length_limit() -> None:
    plan = LengthPlan(8, 4, "data", 10, 5, 8, 9, None, None, None, None)
    report = FitReport("train", rows=10, kept=9, skipped=1)  # 1 of 10 too long: at the 10% limit
    report.add_unreadable(5, ["f.jsonl:1: bad", "f.jsonl:2: bad"])
    assert (report.rows, report.skipped, report.unreadable, report.too_long) == (15, 6, 5, 1)
    assert report.first_skipped[:2] == ["f.jsonl:1: bad", "f.jsonl:2: bad"]
    check_lost(report, plan)  # 1 of 15 rows too long is fine
    report.add_skipped("f.jsonl:9: too long")  # 2 of 15 too long: over the limit
    with pytest.raises(ValueError, match=rf"^2 of 15 train rows do not fit .* fit {COVERAGE:.0%} of them"):
        check_lost(report, plan)


def test_fingerprint_tells_splits_apart() -> None:
    from peftlab.training.encoding import Encoded

    a, b = Encoded([1, 2], [-100, 2]), Encoded([3], [3])
    assert data_fingerprint([a, b]) == data_fingerprint([a, b])
    assert data_fingerprint([a, b]) != data_fingerprint([a], [b])  # where one split ends counts
    assert data_fingerprint([a, b]) != data_fingerprint([b, a])
