"""The lesson's decision rules, and measured results (method rows, data-size curves) overriding them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peftlab.cli import main
from peftlab.recommend import Constraints, nearest_size, recommend


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


# --- measured data-size curves (compare --sizes) -------------------------------------------------

# quality per size: IA3 best at 64 (LoRA tied), bottleneck at 256 (LoRA tied), LoRA at 1,024 (full tied)
_CURVE = {
    64: {"ia3": 0.70, "lora": 0.66, "bottleneck": 0.55, "full": 0.50},
    256: {"bottleneck": 0.85, "lora": 0.82, "ia3": 0.75, "full": 0.70},
    1024: {"lora": 0.88, "full": 0.87, "bottleneck": 0.84, "ia3": 0.78},
}
_TIED = {64: ["ia3", "lora"], 256: ["bottleneck", "lora"], 1024: ["lora", "full"]}


def _point(size: int, method: str) -> dict[str, Any]:
    mean = _CURVE[size][method]
    quality = {"mean": mean, "ci_low": mean - 0.04, "ci_high": mean + 0.04, "std": 0.0, "n": 1}
    return {"size": size, "quality": quality, "tied_with_best": method in _TIED[size]}


def _curve_results(with_rows: bool = True) -> dict[str, Any]:
    """compare's results with curves, as the lead's schema writes them; the method rows carry
    mergeability and measured peak memory (LoRA's with its run config)."""
    methods = ["lora", "ia3", "bottleneck", "full"]
    curves = {
        "sizes": [64, 256, 1024],
        "metric": "accuracy",
        "methods": {m: [_point(s, m) for s in _CURVE] for m in methods},
        "per_size": [{"size": s, "best": _TIED[s][0], "tied": list(_TIED[s])} for s in _CURVE],
        "order_changes": ["IA3 ahead of LoRA up to 64 examples; LoRA ahead from 256"],
    }
    peaks = {"lora": 2e9, "ia3": 1e9, "bottleneck": 2e9, "full": 5e9}
    rows = [
        {
            "method": m,
            "mergeable": m != "bottleneck",
            "peak_memory_bytes": peaks[m],
            "quality": {"mean": _CURVE[1024][m]},
            "config": {"r": 4, "lora_alpha": 8} if m == "lora" else None,
        }
        for m in methods
    ]
    return {"curves": curves, "methods": rows} if with_rows else {"curves": curves}


def test_curve_at_a_measured_size_names_the_best_there() -> None:
    rec = recommend(Constraints(num_examples=256), _curve_results())
    assert (rec.method, rec.source, rec.curve_size) == ("bottleneck", "curve", 256)
    assert rec.basis == "measured curve at 256 examples (N=256)"
    assert rec.reasons[0].startswith("measured accuracy at 256 examples: bottleneck 0.850 [0.810, 0.890]")
    assert not any("lies between" in r or "measured size" in r for r in rec.reasons)


@pytest.mark.parametrize(
    ("n", "size"),
    [
        (256, 256),
        (300, 256),  # 1.17x above 256, 3.41x below 1,024
        (600, 1024),  # nearer 256 in examples (344 vs 424), nearer 1,024 as a ratio (2.34x vs 1.71x)
        (150, 256),  # 2.34x above 64, 1.71x below 256
        (128, 64),  # exactly midway on a log scale: the smaller size
        (129, 256),
        (10, 64),
        (5000, 1024),
    ],
)
def test_nearest_size_is_nearest_on_a_log_scale(n: int, size: int) -> None:
    assert nearest_size([64, 256, 1024], n)[0] == size


def test_curve_between_sizes_says_which_size_and_why() -> None:
    rec = recommend(Constraints(num_examples=600), _curve_results())
    assert (rec.method, rec.curve_size) == ("lora", 1024)
    assert rec.basis == "measured curve at 1,024 examples (nearest to N=600)"
    assert (
        "N=600 lies between the measured sizes 256 and 1,024: 1,024 is nearer on a log scale "
        "(2.34x above 256, 1.71x below 1,024)" in rec.reasons
    )
    assert rec.settings == {"r": 4, "lora_alpha": 8}  # the config compare measured, not the preset


def test_curve_replaces_the_few_examples_rule() -> None:
    """150 examples: the lesson's rule says IA3, but the curve measured at 256 (the nearest size)
    says bottleneck; the rule is mentioned, not followed."""
    rec = recommend(Constraints(num_examples=150), _curve_results())
    assert recommend(Constraints(num_examples=150)).method == "ia3"
    assert rec.method == "bottleneck"
    assert any(r.startswith("the lesson's rule would pick ia3 (150 training examples") for r in rec.reasons)


@pytest.mark.parametrize(
    ("n", "size", "method", "note"),
    [
        (10, 64, "ia3", "N=10 is below the smallest measured size 64: using 64"),
        (5000, 1024, "lora", "N=5000 is beyond the largest measured size 1,024: using 1,024"),
    ],
)
def test_curve_outside_the_measured_range_uses_the_end_and_says_so(
    n: int, size: int, method: str, note: str
) -> None:
    rec = recommend(Constraints(num_examples=n), _curve_results())
    assert (rec.method, rec.curve_size) == (method, size)
    assert rec.basis == f"measured curve at {size:,} examples (nearest to N={n})"
    assert note in rec.reasons


def test_curve_keeps_ties_as_ties() -> None:
    """At 1,024 LoRA is best and full fine-tuning tied with it: LoRA is named, full listed as
    equally good with the test's meaning, not ranked below it."""
    rec = recommend(Constraints(num_examples=1024), _curve_results())
    assert (rec.method, rec.tied, rec.candidates) == ("lora", ["full"], [])
    assert (
        "tied with lora at 1,024 examples (no significant difference from the best in compare's paired "
        "test, p >= 0.05): full 0.870 [0.830, 0.910]" in rec.reasons
    )
    assert "equally good at 1,024 examples (tied): full" in rec.render()
    assert "measured: IA3 ahead of LoRA up to 64 examples; LoRA ahead from 256" in rec.reasons


@pytest.mark.parametrize("with_rows", [True, False])
def test_curve_constraint_excluding_the_best_takes_the_best_remaining(with_rows: bool) -> None:
    """Zero overhead at 256: bottleneck (the best) cannot be merged, LoRA (tied with it) is the best
    that can. Without method rows the presets say what merges."""
    rec = recommend(Constraints(num_examples=256, zero_overhead=True), _curve_results(with_rows))
    assert (rec.method, rec.source, rec.tied) == ("lora", "curve", [])
    assert (
        "the best at 256 examples, bottleneck (accuracy 0.850 [0.810, 0.890]), does not meet"
        in (rec.reasons[0])
    )
    assert "lora (0.820 [0.780, 0.860]) is the best that does, tied with it" in rec.reasons[0]
    assert "excluded: bottleneck (cannot be merged)" in rec.reasons


def test_curve_memory_budget_leaves_a_method_below_the_best() -> None:
    """A 1.5 GB budget at 256 leaves only IA3 (1 GB measured peak), which is significantly worse."""
    rec = recommend(Constraints(num_examples=256, memory_budget_gb=1.5), _curve_results())
    assert rec.method == "ia3"
    assert "ia3 (0.750 [0.710, 0.790]) is the best that does, significantly below it" in rec.reasons[0]
    assert any("lora (measured peak 2.00 GB > budget)" in r for r in rec.reasons)


def test_curve_with_nothing_allowed_falls_back_to_the_rules() -> None:
    rec = recommend(Constraints(num_examples=256, memory_budget_gb=0.5), _curve_results())
    assert (rec.method, rec.source, rec.curve_size) == ("lora", "rules", None)
    assert rec.basis == "the lesson's rule (no measured method met the constraints)"
    assert "at 256 examples: lora (measured peak 2.00 GB > budget)" in rec.reasons[-1]


def test_without_curves_or_examples_the_source_is_unchanged() -> None:
    assert (recommend(Constraints(num_examples=150)).source, recommend(Constraints()).curve_size) == (
        "rules",
        None,
    )
    rec = recommend(Constraints(num_examples=150), _results())  # type: ignore[arg-type]
    assert (rec.method, rec.source, rec.tied) == ("bottleneck", "results", [])
    rec = recommend(Constraints(), _curve_results())  # curves, but no number of examples
    assert (rec.method, rec.source) == ("lora", "results")  # best in the method rows (0.88)
    assert "give the number of training examples (--examples N)" in rec.reasons[-1]
    with pytest.raises(ValueError, match=r"the results hold only curves: give the number of training"):
        recommend(Constraints(), _curve_results(with_rows=False))


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting ``curves[path...] = value`` (``_DELETE`` removes the key)."""

    def mutate(curves: dict[str, Any]) -> None:
        *parents, last = path
        target = curves
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set(["sizes"], _DELETE), r"malformed curves in the results: curves has no 'sizes'$"),
        (_set(["per_size"], _DELETE), r"curves has no 'per_size'"),
        (_set(["sizes"], [64, 1024, 256]), r"curves.sizes must be increasing, got \[64, 1024, 256\]"),
        (
            _set(["sizes"], [64, 64, 1024]),
            r"curves.sizes must be increasing, got \[64, 64, 1024\] \(64 after 64\)",
        ),
        (_set(["sizes"], [0, 256, 1024]), r"curves.sizes must be a non-empty list of positive integers"),
        (_set(["methods", "lora", 1], _DELETE), r"curves.methods.lora has no point at size 256$"),
        (_set(["methods", "ia3", 0, "size"], 512), r"curves.methods.ia3 has a point at size 512, which"),
        (_set(["methods", "ia3", 0], {"size": 64}), r"curves.methods.ia3\[0\] has no 'quality'"),
        (_set(["methods", "full", 2, "quality"], {"std": 0.0}), r"methods.full\[2\].quality has no 'mean'"),
        (_set(["methods"], {}), r"curves.methods is not a non-empty object"),
        (_set(["per_size", 2], _DELETE), r"curves.per_size must hold one entry per size \(3\), got 2"),
        (_set(["per_size", 1, "size"], 1024), r"curves.per_size\[1\] is for size 1024, expected 256"),
        (_set(["per_size", 0, "best"], "dora"), r"curves.per_size\[0\].best 'dora' is not one of"),
        (
            _set(["per_size", 0, "tied"], ["lora"]),
            r"per_size\[0\].tied does not include the best method 'ia3'",
        ),
        (_set(["per_size", 0, "tied"], ["ia3", "x"]), r"per_size\[0\].tied must list methods of curves"),
    ],
)
def test_malformed_curves_say_what_is_wrong(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    results = _curve_results()
    mutate(results["curves"])
    with pytest.raises(ValueError, match=message):
        recommend(Constraints(num_examples=300), results)
    with pytest.raises(ValueError, match=message):  # checked even when the curve is not read
        recommend(Constraints(), results)


def test_curves_that_are_not_an_object_are_refused() -> None:
    with pytest.raises(ValueError, match=r"malformed curves in the results: 'curves' is not an object"):
        recommend(Constraints(num_examples=300), {"curves": [64, 256], "methods": []})


def test_cli_reads_the_curve(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_curve_results()))
    assert main(["recommend", "--results", str(path), "--examples", "300"]) == 0
    out = capsys.readouterr().out
    assert (
        "recommended method: bottleneck\ndecided by: measured curve at 256 examples (nearest to N=300)" in out
    )
    assert "equally good at 256 examples (tied): lora" in out
    assert main(["recommend", "--results", str(path), "--examples", "300", "--zero-overhead", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {k: data[k] for k in ("method", "source", "curve_size", "tied")} == {
        "method": "lora",
        "source": "curve",
        "curve_size": 256,
        "tied": [],
    }
    assert main(["recommend", "--examples", "300", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["source"], data["basis"], data["curve_size"]) == ("rules", "the lesson's rule", None)
    assert main(["recommend", "--examples", "300"]) == 0
    assert "decided by: the lesson's rule\n" in capsys.readouterr().out


def test_cli_bad_curves_and_examples_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    results = _curve_results()
    results["curves"]["sizes"] = [64, 1024, 256]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert main(["recommend", "--results", str(path), "--examples", "300"]) == 2
    assert capsys.readouterr().err == (
        "peftlab recommend: error: malformed curves in the results: curves.sizes must be increasing, "
        "got [64, 1024, 256] (256 after 1024)\n"
    )
    for bad in ("0", "-3"):
        assert main(["recommend", "--examples", bad]) == 2
        expected = f"--examples must be a positive number of training examples, got {bad}"
        assert capsys.readouterr().err == f"peftlab recommend: error: {expected}\n"
