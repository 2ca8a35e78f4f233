"""``compare --sizes`` end to end on a tiny model: every method at every size on nested subsets,
the curves, the plot, the report's sections, forgetting beside quality, and a comparison killed
in the middle of a size that resumes to the same figures as one never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import WORDS
from peftlab.cli import main
from peftlab.compare.store import Store, default_storage

SIZES = "8,24"


def _data(path: Path) -> Path:
    rows = [{"prompt": f"q {a} {b} :", "completion": f" ans {a}"} for a in WORDS[:6] for b in WORDS[:8]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return ["compare", "--quick", "--model", str(model), "--data", str(data), "--threads", "1",
            "--methods", "lora,ia3", "--sizes", SIZES, "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def curve_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("curves")
    out = root / "out"
    assert main(_args(tiny_llama, _data(root / "d.jsonl"), out)) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_method_at_every_size(curve_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = curve_run
    curves = results["curves"]
    assert curves["sizes"] == [8, 24] and set(curves["methods"]) == {"lora", "ia3"}
    for points in curves["methods"].values():
        assert [p["size"] for p in points] == [8, 24]
        for p in points:
            q = p["quality"]
            assert q.get("ci_low", -1) <= q["mean"] <= q.get("ci_high", 2)
    for entry in curves["per_size"]:
        assert entry["best"] in entry["tied"]
    # the table is the largest size; the smaller size trained on fewer examples
    budgets = results["settings"]["sizes_budgets"]
    assert budgets["8"]["budget"] < budgets["24"]["budget"]
    assert (out / "data_size_curves.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Data-size curves" in report and "| Training examples | Best | Tied with it |" in report
    assert "## The lesson's claims, checked on this run" in report


def test_forgetting_beside_quality(curve_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = curve_run
    assert results["zero_shot"]["forgetting"]["value"] == 0.0
    assert results["retain"]["kind"] == "loss" and "retain.txt" in results["retain"]["source"]
    for row in results["methods"]:
        f = row["forgetting"]
        assert f["ci_low"] <= f["value"] <= f["ci_high"] and f["passages"] >= 2
    assert (out / "quality_vs_forgetting.png").stat().st_size > 0
    claims = {c["claim"]: c["verdict"] for c in results["claims"]}
    assert claims["IA³ trains about 6x fewer parameters than LoRA r=8"] in ("holds", "does not hold")


def test_nested_subsets(tiny_llama: Path, tmp_path: Path) -> None:
    from peftlab.compare.inputs import load_inputs
    from peftlab.compare.options import CompareOptions, resolve_options
    from peftlab.compare.session import Session

    opts = resolve_options(
        CompareOptions(
            model=str(tiny_llama), data=str(_data(tmp_path / "d.jsonl")), quick=True, sizes=(8, 24)
        )
    )
    session = Session(load_inputs(opts))
    small, large = session.at_size(8), session.at_size(24)
    assert len(small.train_encoded) == 8 and len(large.train_encoded) == 24
    assert small.train_encoded == large.train_encoded[:8]  # each smaller set inside the larger
    again = Session(load_inputs(opts)).at_size(8)
    assert again.train_encoded == small.train_encoded  # the same sets from the same data
    assert small.sizes.budget < large.sizes.budget


KILL = """
import sys
from peftlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_in_the_middle_of_a_size_resumes_to_the_same_figures(
    tiny_llama: Path, tmp_path: Path, curve_run: tuple[Path, dict[str, Any]]
) -> None:
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "killed"
    args = _args(tiny_llama, data, out)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while True:  # kill it once the first unit of the larger size is under way
            assert proc.poll() is None and time.monotonic() < deadline, (
                "compare ended before it could be killed"
            )
            if (out / "compare.db").exists() and Store(default_storage(out)).is_done("ia3@8"):
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "results.json").exists()
    assert main(args) == 0
    resumed = json.loads((out / "results.json").read_text())
    clean = curve_run[1]
    for method in ("lora", "ia3"):
        assert [p["quality"] for p in resumed["curves"]["methods"][method]] == [
            p["quality"] for p in clean["curves"]["methods"][method]
        ]
    assert resumed["curves"]["per_size"] == clean["curves"]["per_size"]


@pytest.mark.parametrize(
    ("sizes", "message"),
    [("8,4", "sizes must increase"), ("8,5000", "the training split holds"), ("2,8", "below the batch size")],
)
def test_bad_sizes_are_one_line_errors(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sizes: str, message: str
) -> None:
    args = _args(tiny_llama, _data(tmp_path / "d.jsonl"), tmp_path / "out")
    args[args.index("--sizes") + 1] = sizes
    assert main([*args, "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
