"""The benchmark scripts cannot rot unnoticed: each imports against the current package and
parses its command line, and the verdict helper gives the exit status the README promises
(0 when every target is met or skipped, 3 when one is missed). Their figures are measured by
running them alone (benchmarks/README.md), never here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "targets.py")

sys.path.insert(0, str(BENCHMARKS))
from targets import MISSED, Targets  # noqa: E402


def test_every_script_is_listed_in_the_benchmarks_readme() -> None:
    readme = (BENCHMARKS / "README.md").read_text()
    assert len(SCRIPTS) >= 6
    assert [p.name for p in SCRIPTS if f"## {p.name}" not in readme] == []


def test_every_script_imports_and_parses_its_command_line() -> None:
    """One process imports every script (as ``python benchmarks/X.py`` would, its folder on the
    path) and asks each for ``--help``."""
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as done:\n"
        "        assert done.code in (0, None), (path, done.code)\n"
        "    else:\n"
        "        raise AssertionError(f'{path}: --help did not exit')\n"
        "    print('ok', path)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\nok ") + done.stdout.startswith("ok ") == len(SCRIPTS)


def test_verdicts_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    targets = Targets()
    assert targets.at_most("step ratio", 0.88, 0.90)
    targets.skip("GPU peak", "no GPU here")
    assert targets.exit_code() == 0
    assert not targets.at_most("memory ratio", 0.551, 0.50)
    assert targets.exit_code() == MISSED == 3 and targets.missed == ["memory ratio"]
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "PASS step ratio: 0.880 (target <= 0.90)",
        "SKIP GPU peak: no GPU here",
        "MISS memory ratio: 0.551 (target <= 0.50)",
    ]


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    """gpu_check.py's smoke run (``--device cpu --tiny``, about 35 s on 2 cores) takes every GPU
    path on the CPU: each part finishes with its wall time and no error; its figures mean
    nothing there, so a missed target (3) passes as well as 0."""
    import json

    out = tmp_path / "gpu_check.json"
    smoke = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--tiny"]
    done = subprocess.run([*smoke, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, MISSED), done.stdout[-2000:] + done.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"train_memory", "mixed_decode", "compare", "serve", "memory_plan"}
    plan = parts["memory_plan"]  # the tiny model leaves full fine-tuning room: micro-batches
    full = plan["trained"]["full"]["plan"]
    assert "lora" in plan["trained"] and full["micro_batch"] < full["batch_size"], plan
    for name, part in parts.items():
        assert part["error"] is None, (name, part["error"])
        assert part["wall_s"] > 0, name
