"""The lesson's decision rules, and measured results overriding them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.recommend import Constraints, recommend


def test_default_is_lora_q_v() -> None:
    rec = recommend(Constraints(num_examples=5000))
    assert rec.method == "lora"
    assert rec.settings["r"] == 8 and rec.settings["lora_alpha"] == 16
    assert "lora-all" in rec.candidates


def test_few_examples_pick_ia3() -> None:
    rec = recommend(Constraints(num_examples=150))
    assert rec.method == "ia3"
    assert any("150" in r for r in rec.reasons)


def test_tight_memory_picks_ia3() -> None:
    rec = recommend(Constraints(num_examples=10_000, memory_budget_gb=8, lora_memory_gb=14.6))
    assert rec.method == "ia3"


def test_memory_that_fits_keeps_lora() -> None:
    assert (
        recommend(Constraints(num_examples=10_000, memory_budget_gb=24, lora_memory_gb=14.6)).method == "lora"
    )


def test_seq2seq_makes_prefix_a_candidate() -> None:
    rec = recommend(Constraints(num_examples=5000, model_type="seq2seq"))
    assert rec.method == "prefix"


def test_multi_task_composition_picks_bottleneck() -> None:
    assert recommend(Constraints(num_examples=5000, num_tasks=4)).method == "bottleneck"


@pytest.mark.parametrize("kwargs", [{"num_tasks": 4}, {"model_type": "seq2seq"}])
def test_need_to_merge_excludes_bottleneck_and_prefix(kwargs: dict[str, object]) -> None:
    rec = recommend(Constraints(num_examples=5000, zero_overhead=True, **kwargs))  # type: ignore[arg-type]
    assert rec.method in {"lora", "ia3"}
    assert not {"bottleneck", "prefix"} & set(rec.candidates)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_type": "rnn"}, r"model type 'rnn' is not one of causal"),
        ({"num_examples": 0}, r"number of examples must be >= 1, got 0"),
        ({"num_tasks": 0}, r"number of tasks must be >= 1, got 0"),
        ({"memory_budget_gb": -1.0}, r"memory budget must be > 0 GB, got -1\.0"),
    ],
)
def test_bad_constraints_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Constraints(**kwargs)  # type: ignore[arg-type]


def _results() -> dict[str, object]:
    return {
        "methods": [
            {
                "method": "lora",
                "quality": {"mean": 0.70, "std": 0.01},
                "peak_memory_bytes": 2e9,
                "mergeable": True,
                "trainable_params": 100,
            },
            {
                "method": "bottleneck",
                "quality": {"mean": 0.90, "std": 0.01},
                "peak_memory_bytes": 2e9,
                "mergeable": False,
                "trainable_params": 800,
            },
            {
                "method": "ia3",
                "quality": {"mean": 0.60, "std": 0.02},
                "peak_memory_bytes": 1e9,
                "mergeable": True,
                "trainable_params": 10,
            },
        ]
    }


def test_measured_quality_overrides_rules() -> None:
    rec = recommend(Constraints(num_examples=5000), _results())  # type: ignore[arg-type]
    assert rec.method == "bottleneck"


def test_measurements_respect_hard_constraints() -> None:
    rec = recommend(Constraints(num_examples=5000, zero_overhead=True), _results())  # type: ignore[arg-type]
    assert rec.method == "lora"
    assert any("bottleneck" in r for r in rec.reasons)
    rec = recommend(Constraints(num_examples=5000, memory_budget_gb=1.5), _results())  # type: ignore[arg-type]
    assert rec.method == "ia3"


def test_cli_prints_method_and_reasons(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["recommend", "--examples", "100"]) == 0
    out = capsys.readouterr().out
    assert "recommended method: ia3" in out and "because:" in out
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    assert main(["recommend", "--results", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "bottleneck"


def test_cli_bad_results_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    assert main(["recommend", "--results", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["recommend", "--results", str(tmp_path / "missing.json")]) == 2
    assert f"{tmp_path / 'missing.json'}: no such results file" in capsys.readouterr().err


def test_significance_decides_what_is_tied_with_the_best() -> None:
    """With compare's paired tests in the results, only methods tied with the best (no significant
    difference) compete on cost and the rule; a measured gap, however small, is not ignored."""
    results = _results()
    rows = results["methods"]
    assert isinstance(rows, list)
    rows[0]["tied_with_best"] = True  # lora: 0.70, but the test cannot tell it from bottleneck
    rows[1]["tied_with_best"] = True  # the best
    rows[2]["tied_with_best"] = False
    rec = recommend(Constraints(num_examples=5000), results)  # type: ignore[arg-type]
    assert rec.method == "lora"  # the rule's default among the tied
    assert "statistically tied methods: lora, bottleneck" in rec.reasons[0]
    rows[0]["tied_with_best"] = False  # now significantly worse
    assert recommend(Constraints(num_examples=5000), results).method == "bottleneck"  # type: ignore[arg-type]
