"""``peftlab compare`` end to end on a tiny llama (seconds per run): lengths from the data and
over-long rows (also for ``peftlab train``), repeatable figures, resume after SIGKILL, refusal
of changed settings, two workers sharing one SQLite store, and bad flags."""

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
from peftlab.data.files import task_from_files
from peftlab.training.encoding import encode_completion
from peftlab.training.fitting import check_lost, fit_examples, plan_lengths
from peftlab.training.lm_head import IGNORE_INDEX
from test_compare_data import _load

SHORT = 96


def _mixed_lengths(path: Path) -> Path:
    """96 short rows, 2 whose prompts alone are far over any limit (cut), 2 whose completions are
    (skipped); line numbers 1-based."""
    rows = [{"prompt": f"q {WORDS[i % 6]} {WORDS[(i // 6) % 6]} :", "completion": f" ans {WORDS[i % 6]}"}
            for i in range(SHORT)]  # fmt: skip
    rows.insert(10, {"prompt": "q " + " ".join(["good"] * 200) + " :", "completion": " ans good"})
    rows.insert(20, {"prompt": "q " + " ".join(["bad"] * 200) + " :", "completion": " ans bad"})
    rows.insert(30, {"prompt": "q x :", "completion": " " + " ".join(["x"] * 150)})
    rows.insert(40, {"prompt": "q y :", "completion": " " + " ".join(["y"] * 150)})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _short_eval(path: Path) -> Path:
    rows = [{"prompt": f"q {w} :", "completion": f" ans {w}"} for w in WORDS[:6] * 4]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _compare(out: Path, model: Path, data: Path, *extra: str, quick: bool = True) -> dict[str, Any]:
    args = ["compare", "--model", str(model), "--data", str(data), "--threads", "1", "--out", str(out)]
    assert main([*args, *(["--quick"] if quick else []), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_fitting_cuts_prompts_from_the_left_and_never_the_completion(
    tiny_llama: Path, tmp_path: Path
) -> None:
    _, tok = _load(tiny_llama, "AutoModelForCausalLM")
    task = task_from_files(
        _mixed_lengths(tmp_path / "mixed.jsonl"), eval_path=_short_eval(tmp_path / "e.jsonl")
    )
    lengths = [
        (len(tok(ex.prompt)["input_ids"]), len(encode_completion(tok, ex.completion))) for ex in task.train
    ]
    plan = plan_lengths(lengths, context=128)
    assert plan.source == "data" and plan.max_length < 20  # the 95% are short rows
    kept, encoded, report = fit_examples(tok, task.train, plan.max_length, part="train")
    assert (report.rows, report.truncated, report.skipped, report.kept) == (100, 2, 2, 98)
    assert report.first_truncated[0].startswith(f"{tmp_path / 'mixed.jsonl'}:11: prompt of 202 tokens cut to")
    assert report.first_skipped[0].startswith(f"{tmp_path / 'mixed.jsonl'}:31: its completion of 151 tokens")
    for ex, enc in zip(kept, encoded, strict=True):
        assert len(enc.input_ids) <= plan.max_length
        completion = encode_completion(tok, ex.completion)
        assert [t for t in enc.labels if t != IGNORE_INDEX] == completion  # every completion token kept
        prompt = tok(ex.prompt)["input_ids"]
        assert enc.prompt_ids == prompt[len(prompt) - len(enc.prompt_ids) :]  # its end, cut from the left
    # a --seq-len that drops most rows is refused, naming one that fits 95% of them
    with pytest.raises(ValueError, match=rf"--seq-len {plan.p95} would fit 95% of them"):
        check_lost(fit_examples(tok, task.train, 3, part="train")[2], plan)
    args = ["compare", "--quick", "--model", str(tiny_llama), "--data", str(tmp_path / "mixed.jsonl")]
    assert main([*args, "--seq-len", "3", "--out", str(tmp_path / "refused")]) == 2


@pytest.mark.parametrize("quick", [True, False])
def test_compare_runs_on_mixed_lengths(tiny_llama: Path, tmp_path: Path, quick: bool) -> None:
    data, held = _mixed_lengths(tmp_path / "mixed.jsonl"), _short_eval(tmp_path / "held.jsonl")
    results = _compare(tmp_path / "out", tiny_llama, data, "--eval-data", str(held), "--methods", "lora,ia3",
                       "--search", "none", quick=quick)  # fmt: skip
    rows = results["task"]["rows"]
    assert rows["train"]["truncated"] + rows["validation"]["truncated"] == 2
    assert rows["train"]["skipped"] + rows["validation"]["skipped"] == 2
    assert rows["test"]["truncated"] == rows["test"]["skipped"] == 0
    lengths = results["settings"]["lengths"]
    assert lengths["source"] == "data" and lengths["max_length"] < 20 and lengths["max_new_tokens"] >= 4
    report = (tmp_path / "out" / "report.md").read_text()
    assert (
        "max length " in report and "prompts cut from the left" in report and ":31: its completion" in report
    )
    assert results["settings"]["budget"] == (48 if quick else 480)


def test_train_runs_on_mixed_lengths(tiny_llama: Path, tmp_path: Path) -> None:
    data = _mixed_lengths(tmp_path / "mixed.jsonl")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--data", str(data), "--steps", "3", "--batch-size", "4",
            "--save-every", "0", "--num-eval", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert rows["train"]["truncated"] + rows["eval"]["truncated"] == 2
    assert rows["train"]["skipped"] + rows["eval"]["skipped"] == 2
    assert metrics["lengths"]["max_length"] == metrics["config"]["max_length"] < 20


def test_the_same_command_twice_gives_the_same_figures(tiny_llama: Path, tmp_path: Path) -> None:
    data = _short_eval(tmp_path / "d.jsonl")
    data.write_text(data.read_text() * 4)
    a = _compare(tmp_path / "a", tiny_llama, data, "--methods", "lora,ia3")
    b = _compare(tmp_path / "b", tiny_llama, data, "--methods", "lora,ia3")
    assert _figures(a) == _figures(b)


def _figures(results: dict[str, Any]) -> list[Any]:
    return [
        (
            r["method"],
            r["learning_rate"],
            r["quality"],
            r["runs"][0]["losses"],
            r["runs"][0]["test"]["predictions"],
        )
        for r in results["methods"]
    ]


def test_changed_settings_are_refused(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _short_eval(tmp_path / "d.jsonl")
    data.write_text(data.read_text() * 4)
    _compare(tmp_path / "out", tiny_llama, data, "--methods", "lora")
    args = [
        "compare",
        "--quick",
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--methods", "lora", "--budget", "64"]) == 2
    err = capsys.readouterr().err
    assert "started with other settings (budget: 48 -> 64)" in err and "use a new --out" in err
    # more methods or seeds change no finished figure: they are run and added
    assert main([*args, "--methods", "lora,ia3"]) == 0


KILL = """
import sys
from peftlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_llama: Path, tmp_path: Path) -> None:
    data = _short_eval(tmp_path / "d.jsonl")
    data.write_text(data.read_text() * 4)
    out = tmp_path / "killed"
    args = ["compare", "--quick", "--model", str(tiny_llama), "--data", str(data), "--threads", "1",
            "--methods", "lora,ia3,bottleneck", "--search", "quick", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while True:  # kill it once the first method is done and the second has begun
            assert proc.poll() is None and time.monotonic() < deadline, (
                "compare ended before it could be killed"
            )
            if (out / "compare.db").exists():
                store = Store(default_storage(out))
                if store.is_done("lora"):
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
    clean = _compare(
        tmp_path / "clean", tiny_llama, data, "--methods", "lora,ia3,bottleneck", "--search", "quick"
    )
    assert _figures(resumed) == _figures(clean)


def test_two_workers_share_one_store_and_agree_with_one(tiny_llama: Path, tmp_path: Path) -> None:
    data = _short_eval(tmp_path / "d.jsonl")
    data.write_text(data.read_text() * 4)
    common = ("--methods", "lora,ia3", "--search", "quick")
    one = _compare(tmp_path / "one", tiny_llama, data, *common)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    two = _compare(tmp_path / "two", tiny_llama, data, *common, "--workers", "2", "--storage", storage)
    assert _figures(two) == _figures(one)
    assert (tmp_path / "shared.db").exists() and not (tmp_path / "two" / "compare.db").exists()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--lr", "lora"], "expected METHOD=LR"),
        (["--lr", "nope=1e-3"], "expected METHOD=LR with METHOD one of"),
        (["--lr", "lora=fast"], "'fast' is not a number"),
        (["--lr", "lora=-1"], "must be > 0"),
        (["--storage", "nosuchdb://x/y"], "--storage 'nosuchdb://x/y': cannot open it"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str], message: str
) -> None:
    assert main(["compare", "--quick", "--out", str(tmp_path), *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_search_effort_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--search", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_a_final_run_going_on_from_its_search_trial_equals_retraining_it(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The chosen search trial is the start of its final run (same schedule, paused at the search
    budget): going on from it in memory gives exactly the figures of training it again."""
    from peftlab.compare.inputs import load_inputs
    from peftlab.compare.options import CompareOptions, resolve_options
    from peftlab.compare.runner import work
    from peftlab.compare.session import Session

    data = _short_eval(tmp_path / "d.jsonl")
    data.write_text(data.read_text() * 4)
    records = []
    for continued in (True, False):
        opts = CompareOptions(
            model=str(tiny_llama), data=str(data), methods=("lora",), budget=48, batch_size=4,
            eval_every=8, search_budget=16, val_size=8, num_eval=8, latency_repeats=1,
            dtype="float32", device="cpu", out=str(tmp_path / f"out-{continued}"),
        )  # fmt: skip
        store = Store(default_storage(Path(opts.out)))
        opts = resolve_options(opts)
        work(opts, Session(load_inputs(opts)), store, continue_trials=continued)
        record = store.get_record("lora", 0)
        assert record is not None and record["continued_search_trial"] is continued
        records.append(record)
    went_on, retrained = records
    assert went_on["search"] == retrained["search"]
    assert went_on["examples_seen"] > 16  # it went past the trial's pause
    for key in (
        "learning_rate",
        "losses",
        "validations",
        "examples_seen",
        "best_examples",
        "test",
        "metrics",
    ):
        assert went_on[key] == retrained[key], key


def test_each_local_worker_takes_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from peftlab.compare.options import CompareOptions
    from peftlab.compare.runner import worker_options

    def host(gpus: int) -> None:
        """Pretend the machine has ``gpus`` CUDA devices, whatever this one really has."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    opts = CompareOptions(workers=3)
    for gpus in (0, 1):  # no GPU, or one to share: every worker keeps the options it was given
        host(gpus)
        assert all(worker_options(opts, i) is opts for i in range(3)), gpus
    host(2)
    assert [worker_options(opts, i).device for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_options(CompareOptions(workers=3, device="cuda"), 2).device == "cuda:0"
    for device in ("cpu", "cuda:1"):  # an explicit device is kept
        assert worker_options(CompareOptions(workers=3, device=device), 1).device == device
    assert worker_options(CompareOptions(workers=1), 0).device == "auto"
    host(4)
    assert [worker_options(CompareOptions(workers=5), i).device for i in range(5)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0",
    ]  # fmt: skip
    host(0)  # and back to none: the same options again, whatever ran before
    assert worker_options(opts, 1) is opts
