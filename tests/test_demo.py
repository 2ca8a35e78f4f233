"""``peftlab demo`` end to end on a tiny llama saved with an offline-built tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peftlab import cli
from test_training import save_tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_demo_runs_end_to_end(
    tiny_model_dir: Path, verbose: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "4", "--num-eval", "3"]
    assert cli.main(argv + verbose) == 0
    out = capsys.readouterr().out
    # tiny llama: hidden 32, 4 query heads, 2 kv heads of 8, FFN 64, 2 layers
    # LoRA r=8 on q (32->32) and v (32->16): 8*(32+32) + 8*(32+16) = 896 per layer
    assert "== LoRA on q_proj, v_proj ==" in out
    assert "trainable params: 1,792 ||" in out
    # IA3 on k and v outputs (16 each) and down_proj's input (64): 96 per layer
    assert "== IA3 on down_proj, k_proj, v_proj ==" in out
    assert "trainable params: 192 ||" in out
    assert out.count("eval: exact_match") == 3  # base, LoRA, IA3
    assert out.count("expected: {") == 3  # three generations shown
    rows = re.findall(r"^(LoRA|IA3) +([\d,]+) +[\d.]+s +[\d.]+ -> [\d.]+$", out, flags=re.M)
    assert rows == [("LoRA", "1,792"), ("IA3", "192")]


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert "--steps, --batch-size and --num-eval must be at least 1" in capsys.readouterr().err
