"""``peftlab compare --quick`` on the embedded SmolLM2-135M, plus its option and data checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from peftlab.cli import main
from peftlab.compare import CompareOptions
from peftlab.compare.options import DEFAULT_METHODS
from peftlab.count import count_methods
from peftlab.data.files import load_data_file, task_from_files


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("compare")
    threads = str(os.cpu_count() or 1)
    assert main(["compare", "--quick", "--threads", threads, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_writes_every_file(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = quick_run
    for name in ("results.json", "report.md", "quality_vs_params.png", "cost.png",
                 "inference_overhead.png", "loss_curves.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert [r["method"] for r in results["methods"]] == list(DEFAULT_METHODS)  # qlora is opt-in
    report = (out / "report.md").read_text()
    for row in results["methods"]:
        assert row["label"] in report
        assert f"{row['trainable_params']:,}" in report


def test_counts_equal_peftlab_count(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    from peftlab.models import resolve_model_path

    path, _ = resolve_model_path(None)
    data = json.loads((Path(path) / "config.json").read_text())
    # both size each preset from the model's own config, through the one table of presets
    counted = {r.label: r for r in count_methods(data).rows}
    for row in results["methods"]:
        assert row["trainable_params"] == counted[row["label"]].trainable, row["method"]
        assert row["total_params"] == counted[row["label"]].total, row["method"]


def test_every_method_beats_the_untrained_model(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    floor = results["zero_shot"]["quality"]
    for row in results["methods"]:
        assert row["quality"]["mean"] > floor, (row["method"], row["quality"], floor)
        losses = row["runs"][0]["losses"]
        assert losses[-1] < losses[0], row["method"]


def test_measurements_are_present_and_sane(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    for row in results["methods"]:
        assert row["median_step_s"] > 0 and row["tokens_per_s"] > 0
        assert row["inference_overhead_unmerged"] > 0
        assert row["adapter_file_bytes"] > 0
        if row["peak_memory_bytes"] is not None:
            assert row["peak_memory_bytes"] > row["estimated_train_memory_bytes"]["weights"] / 2
        assert (row["inference_overhead_merged"] is None) == (not row["mergeable"])
    by_name = {r["method"]: r for r in results["methods"]}
    assert by_name["ia3"]["trainable_params"] < by_name["lora"]["trainable_params"]
    assert by_name["full"]["trainable_params"] == by_name["full"]["total_params"]
    assert results["versions"]["torch"] and results["command"].startswith("peftlab compare")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ("lora", "dora")}, "unknown"),
        ({"steps": 0}, "--steps"),
        ({"task": "topic", "data": "x.jsonl"}, "either --task or --data"),
        ({"data": "x.jsonl", "hf_dataset": "imdb"}, "not more than one"),
        ({"eval_data": "x.jsonl"}, "--eval-data needs --data"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompareOptions(**kwargs).validate()


def test_cli_rejects_bad_lr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--lr", "lora=fast"]) == 2
    assert "not a number" in capsys.readouterr().err


def test_data_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"sample {i}", "label": "yes" if i % 2 else "no"})
                               for i in range(10)))  # fmt: skip
    data = load_data_file(jsonl)
    assert data.kind == "classification" and data.labels == ("no", "yes")
    task = task_from_files(jsonl, eval_fraction=0.2, seed=3)
    assert len(task.eval) == 2 and len(task.train) == 8
    assert sorted(ex.label for ex in task.eval) == ["no", "yes"]  # one per label: stratified
    assert task_from_files(jsonl, eval_fraction=0.2, seed=3).eval == task.eval
    assert task.score([" yes", "no"], [" yes", " yes"])["accuracy"] == 0.5
    csv = tmp_path / "g.csv"
    # bad rows are skipped and counted, but 1 of 2 is past the bad-row limit: an error
    csv.write_text('prompt,completion\n"a","b"\n"c",\n')
    with pytest.raises(ValueError, match=r"1 of 2 rows are bad.*g\.csv:3: missing field 'completion'"):
        load_data_file(csv)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not valid JSON"):
        load_data_file(bad)
    with pytest.raises(ValueError, match="unknown data format"):
        load_data_file(tmp_path / "x.parquet")
