"""Memory plans: micro-batches with gradient accumulation, then activation checkpointing, from the
training-memory estimate; out-of-memory errors survived by halving the micro-batch, in
``peftlab compare`` (per method, remembered by a resumed comparison) and ``peftlab train
--auto-batch``; and ``--max-memory`` checked. Out-of-memory errors are injected on the CPU at a
chosen step or above a chosen forward-pass size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import peftlab.training.loop as loop_module
from conftest import WORDS
from peftlab.cli import main
from peftlab.compare.memory_plan import PLAN_RECORD
from peftlab.compare.store import Store, default_storage
from peftlab.training.encoding import Encoded
from peftlab.training.lm_head import IGNORE_INDEX
from peftlab.training.loop import TrainConfig, TrainLoop
from peftlab.training.memory import (
    GIB,
    ActivationAssumption,
    MemoryPlan,
    MemoryPlanner,
    gib,
    halved,
    is_out_of_memory,
)


# ---- the planner ---------------------------------------------------------------------------------
def _linear(per_example: int, fixed: int = 0, checkpointed_share: float = 0.25) -> Any:
    """estimate(micro, checkpointing) = fixed + micro * per_example (a quarter with checkpointing)."""
    return lambda micro, ckpt: fixed + int(micro * per_example * (checkpointed_share if ckpt else 1.0))


def test_the_whole_batch_when_it_fits() -> None:
    plan = MemoryPlanner(_linear(100, 1000), 8, 1800, True).first()
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing, plan.fits) == (8, 1, False, True)
    assert plan.needed_bytes == 1800 and plan.describe() == "8 x 1"


def test_micro_batches_before_checkpointing_then_checkpointing_then_does_not_fit() -> None:
    planner = MemoryPlanner(_linear(100, 1000), 8, 1250, True)
    plan = planner.first()  # 8 -> 1800, 4 -> 1400, 2 -> 1200 fits
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (2, 4, False)
    plan = MemoryPlanner(_linear(100, 1000), 8, 1060, True).first()  # 1 -> 1100 too; ckpt 8 -> 1200 ...
    assert (plan.micro_batch, plan.checkpointing, plan.needed_bytes) == (2, True, 1050)
    plan = MemoryPlanner(_linear(100, 1000), 8, 1010, True).first()  # ckpt at 1 -> 1025: no
    assert not plan.fits and (plan.micro_batch, plan.checkpointing, plan.needed_bytes) == (1, True, 1025)
    assert plan.refusal() == f"does not fit: needs about {gib(1025)}, {gib(1010)} available"
    # a method that cannot checkpoint stops at one example without it
    plan = MemoryPlanner(_linear(100, 1000), 8, 1060, False).first()
    assert not plan.fits and (plan.micro_batch, plan.checkpointing, plan.needed_bytes) == (1, False, 1100)


def test_odd_batches_halve_rounding_up_and_keep_every_example() -> None:
    assert [halved(n) for n in (8, 6, 5, 3, 2, 1)] == [4, 3, 3, 2, 1, 1]
    plan = MemoryPlanner(_linear(100), 6, 250, False).first()  # 6, 3 (300), 2 (200)
    assert (plan.micro_batch, plan.accumulation) == (2, 3)
    plan = MemoryPlanner(_linear(100), 5, 300, False).first()  # 5, 3 (300)
    assert (plan.micro_batch, plan.accumulation) == (3, 2)  # forward passes of 3 and 2


def test_after_out_of_memory_halves_then_checkpoints_then_gives_up() -> None:
    planner = MemoryPlanner(_linear(100), 4, None, True)
    plan = planner.first()
    assert (plan.micro_batch, plan.checkpointing) == (4, False)  # nothing known: the whole batch
    steps = []
    while plan.fits:
        plan = planner.after_out_of_memory(plan)
        steps.append((plan.micro_batch, plan.checkpointing, plan.fits, plan.out_of_memory))
    assert steps == [(2, False, True, 1), (1, False, True, 2), (1, True, True, 3), (1, True, False, 4)]


def test_asked_for_checkpointing_stays_on() -> None:
    plan = MemoryPlanner(_linear(100, 100), 8, 10_000, False, always_checkpoint=True).first()
    assert (plan.micro_batch, plan.checkpointing, plan.needed_bytes) == (8, True, 300)


def test_a_plan_round_trips_and_says_how_it_ran_out() -> None:
    plan = MemoryPlan(8, 2, True, 3 * GIB, 4 * GIB, fits=False, out_of_memory=3)
    assert MemoryPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.to_dict()["shown"] == "2 x 4 + checkpointing"
    assert plan.refusal() == (
        "does not fit: ran out of memory at micro-batch 1 with checkpointing "
        "(estimated 3 GiB, 4 GiB available)"
    )
    assert gib(1536 * 1024**2) == "1.5 GiB" and gib(300 * 1024**2) == "300 MiB" and gib(2048) == "2 KiB"


def test_checkpointing_keeps_only_each_layers_input() -> None:
    plain = ActivationAssumption(4, 128, 30, 576, 0)
    ckpt = ActivationAssumption(4, 128, 30, 576, 0, checkpointing=True)
    tokens_h = 4 * 128 * 576
    assert plain.bytes(4) == 30 * tokens_h * 34 * 2
    assert ckpt.bytes(4) == 30 * tokens_h * 2 * 2 + tokens_h * 34 * 2  # inputs + one layer recomputed
    assert ckpt.bytes(4) < plain.bytes(4) / 5


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (MemoryError(), True),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
            True,
        ),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_is_told_from_other_errors(err: BaseException, expected: bool) -> None:
    assert is_out_of_memory(err) is expected


# ---- the loop: micro-batches give the full batch's step ------------------------------------------
@pytest.mark.parametrize(("batch", "micro", "accum"), [(6, 4, 1), (4, 1, 2), (5, 2, 1)])
def test_micro_batches_equal_the_whole_batch(
    batch: int, micro: int, accum: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch in forward passes of at most ``micro`` (an uneven last piece included) trains to
    the same losses and parameters as the whole batch at once (fp32 rounding: 1e-5)."""
    from conftest import build_model
    from peftlab import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(5)
    data = []
    for i in range(24):
        prompt = torch.randint(3, 96, (3 + i % 5,), generator=g).tolist()
        completion = [*torch.randint(3, 96, (1 + i % 4,), generator=g).tolist(), 2]
        data.append(Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    sizes: list[int] = []
    original = loop_module.supervised_loss_sum

    def counted(forward: Any, model: Any, batch_: dict[str, torch.Tensor], labels: torch.Tensor) -> Any:
        sizes.append(int(labels.shape[0]))
        return original(forward, model, batch_, labels)

    monkeypatch.setattr(loop_module, "supervised_loss_sum", counted)

    def run(micro_batch: int | None) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = get_peft_model(build_model("llama"), LoraConfig(r=4, init_lora_weights=False))
        config = TrainConfig(steps=3, batch_size=batch, grad_accum=accum, learning_rate=1e-2, seed=1,
                             micro_batch_size=micro_batch)  # fmt: skip
        loop = TrainLoop(model, data, config, pad_token_id=0)
        loop.run(progress=False)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loop.history.losses, trained

    whole_losses, whole = run(None)
    assert sizes == [batch] * 3 * accum
    sizes.clear()
    split_losses, split = run(micro)
    pieces = [micro] * (batch // micro) + ([batch % micro] if batch % micro else [])
    assert sizes == pieces * 3 * accum  # really in forward passes of at most `micro`
    assert split_losses == pytest.approx(whole_losses, rel=1e-5)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_micro_batch_above_the_batch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"micro_batch_size must be in \[1, batch_size=4\], got 5"):
        TrainConfig(batch_size=4, micro_batch_size=5)


# ---- compare ---------------------------------------------------------------------------------------
def _data(path: Path) -> Path:
    rows = [{"prompt": f"q {w} :", "completion": f" ans {w}"} for w in WORDS[:6] * 16]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _compare(out: Path, model: Path, data: Path, *extra: str) -> dict[str, Any]:
    args = ["compare", "--model", str(model), "--data", str(data), "--threads", "1", "--out", str(out),
            "--quick", "--dtype", "float32", "--retain-data", "none"]  # fmt: skip
    assert main([*args, *extra]) == 0
    return json.loads((out / "results.json").read_text())


class InjectedOOM:
    """Replaces the loop's loss: raises out-of-memory on a forward pass of more than ``above``
    examples, at optimizer step ``at_step`` (1-based, counted over the whole process) once, or
    always when the model is not a PeftModel (``full``: full fine-tuning never fits)."""

    def __init__(self, *, above: int | None = None, at_step: int | None = None, full: bool = False) -> None:
        self.above, self.at_step, self.full = above, at_step, full
        self.original = loop_module.supervised_loss_sum
        self.raised = 0
        self.calls_by_step: dict[int, int] = {}

    def __call__(self, forward: Any, model: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> Any:
        from peftlab import PeftModel

        rows = int(labels.shape[0])
        if self.full and not isinstance(model, PeftModel):
            self.raised += 1
            raise torch.OutOfMemoryError("injected: full fine-tuning never fits")
        if self.above is not None and rows > self.above:
            self.raised += 1
            raise torch.OutOfMemoryError(f"injected: {rows} rows > {self.above}")
        return self.original(forward, model, batch, labels)


def _inject(monkeypatch: pytest.MonkeyPatch, injected: InjectedOOM) -> InjectedOOM:
    monkeypatch.setattr(loop_module, "supervised_loss_sum", injected)
    return injected


def _at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """Out-of-memory once, in the forward pass of the ``step``-th optimizer step (counted from
    the first TrainLoop step this process takes)."""
    original_step = TrainLoop._step
    seen: list[int] = []

    def step_once(self: TrainLoop, device: torch.device) -> None:
        seen.append(1)
        if len(seen) == step:
            raise torch.OutOfMemoryError(f"injected at step {step}")
        original_step(self, device)

    monkeypatch.setattr(TrainLoop, "_step", step_once)
    return seen


def _plan(results: dict[str, Any], method: str) -> dict[str, Any]:
    return next(r for r in results["methods"] if r["method"] == method)["memory_plan"]


def _figures(results: dict[str, Any]) -> list[tuple[str, float, list[float]]]:
    return [
        (r["method"], r["metrics"]["eval_loss"]["mean"], r["runs"][0]["losses"]) for r in results["methods"]
    ]


def _close(a: list[tuple[str, float, list[float]]], b: list[tuple[str, float, list[float]]]) -> None:
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, loss_a, losses_a), (_, loss_b, losses_b) in zip(a, b, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert losses_a == pytest.approx(losses_b, rel=1e-5)


@pytest.fixture(scope="module")
def plain_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """lora and full fine-tuning with nothing in the way: the figures the others must equal."""
    tmp = tmp_path_factory.mktemp("plain")
    return _compare(tmp / "out", tiny_llama, _data(tmp / "d.jsonl"), "--methods", "lora,full")


def test_out_of_memory_above_a_size_halves_until_it_fits_with_the_same_figures(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain_run: dict[str, Any]
) -> None:
    injected = _inject(monkeypatch, InjectedOOM(above=2))
    results = _compare(tmp_path / "out", tiny_llama, _data(tmp_path / "d.jsonl"), "--methods", "lora,full")
    assert injected.raised == 4  # 8 and 4 rows, for each method
    for method in ("lora", "full"):
        plan = _plan(results, method)
        assert (plan["micro_batch"], plan["accumulation"], plan["checkpointing"]) == (2, 4, False)
        assert plan["out_of_memory"] == 2 and plan["fits"]
    _close(_figures(results), _figures(plain_run))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 2 x 4 (after OOM) |" in report and "Micro-batch x accum." in report


def test_out_of_memory_at_a_chosen_step_restarts_that_run(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain_run: dict[str, Any]
) -> None:
    _at_step(monkeypatch, 3)  # lora's run, third step
    results = _compare(tmp_path / "out", tiny_llama, _data(tmp_path / "d.jsonl"), "--methods", "lora,full")
    assert _plan(results, "lora")["micro_batch"] == 4 and _plan(results, "lora")["out_of_memory"] == 1
    assert _plan(results, "full")["micro_batch"] == 8 and _plan(results, "full")["out_of_memory"] == 0
    _close(_figures(results), _figures(plain_run))


def test_a_method_that_never_fits_gets_a_row_saying_so_and_a_resume_remembers(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain_run: dict[str, Any]
) -> None:
    data, out = _data(tmp_path / "d.jsonl"), tmp_path / "out"
    with monkeypatch.context() as patch:
        _inject(patch, InjectedOOM(full=True))
        results = _compare(out, tiny_llama, data, "--methods", "lora,full")
    assert [r["method"] for r in results["methods"]] == ["lora"]
    (unfit,) = results["did_not_fit"]
    assert unfit["method"] == "full" and unfit["memory_plan"]["out_of_memory"] == 5  # 8, 4, 2, 1, 1+ckpt
    assert unfit["memory_plan"]["micro_batch"] == 1 and unfit["memory_plan"]["checkpointing"]
    assert unfit["reason"].startswith("does not fit: ran out of memory at micro-batch 1 with checkpointing")
    report = (out / "report.md").read_text()
    assert "| Full fine-tuning |" in report and unfit["reason"] in report
    _close(_figures(results), _figures(plain_run)[:1])
    # the rerun trains nothing again and remembers: full fine-tuning still does not fit
    again = _compare(out, tiny_llama, data, "--methods", "lora,full")
    assert again["did_not_fit"] == results["did_not_fit"]
    store = Store(default_storage(out))
    assert store.get_record(PLAN_RECORD + "full", 0)["fits"] is False  # type: ignore[index]


def test_max_memory_too_small_for_full_fine_tuning(tiny_llama: Path, tmp_path: Path) -> None:
    """Between LoRA's and full fine-tuning's need at one example: LoRA trains in micro-batches,
    full fine-tuning's row says what it needs and what there was."""
    results = _compare(
        tmp_path / "out",
        tiny_llama,
        _data(tmp_path / "d.jsonl"),
        "--methods",
        "lora,full",
        "--max-memory",
        "0.00015",
    )
    lora = _plan(results, "lora")
    assert lora["fits"] and lora["micro_batch"] < 8 and lora["needed_bytes"] <= 0.00015 * GIB
    (unfit,) = results["did_not_fit"]
    plan = unfit["memory_plan"]
    assert unfit["method"] == "full" and plan["needed_bytes"] > plan["available_bytes"] == int(0.00015 * GIB)
    assert (
        unfit["reason"]
        == f"does not fit: needs about {gib(plan['needed_bytes'])}, {gib(plan['available_bytes'])} available"
    )
    row = next(r for r in results["methods"] if r["method"] == "lora")
    assert row["estimated_train_memory_bytes"]["total"] == lora["needed_bytes"]  # estimate at the plan


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--max-memory 0.0: give the GiB a method may take, a number above 0"),
        ("-2", "--max-memory -2.0: give the GiB"),
        ("nan", "--max-memory nan: give the GiB"),
        ("0.00001", "--max-memory 1e-05: no method fits; the least demanding, lora, needs about"),
    ],
)
def test_bad_max_memory_is_a_one_line_error(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    args = ["compare", "--quick", "--model", str(tiny_llama), "--data", str(_data(tmp_path / "d.jsonl")),
            "--methods", "lora,full", "--out", str(tmp_path / "out"), "--max-memory", value]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "results.json").exists()


# ---- train --auto-batch ------------------------------------------------------------------------------
def _train(out: Path, model: Path, data: Path, *extra: str) -> int:
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "4", "--batch-size", "8",
            "--num-eval", "4", "--out", str(out), "--method", "lora"]  # fmt: skip
    return main([*args, *extra])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_train_auto_batch_goes_on_from_its_checkpoint_after_out_of_memory(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _data(tmp_path / "d.jsonl")
    assert _train(tmp_path / "plain", tiny_llama, data) == 0
    _at_step(monkeypatch, 3)  # after the checkpoint of step 2
    assert _train(tmp_path / "auto", tiny_llama, data, "--auto-batch", "--save-every", "2") == 0
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert metrics["memory_plan"]["micro_batch"] == 4 and metrics["memory_plan"]["out_of_memory"] == 1
    assert metrics["history"]["losses"] == pytest.approx(plain["history"]["losses"], rel=1e-5)
    for name, value in _adapter(tmp_path / "plain").items():
        torch.testing.assert_close(_adapter(tmp_path / "auto")[name], value, rtol=1e-5, atol=1e-6)


def test_train_out_of_memory_without_auto_batch_says_what_to_do(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _inject(monkeypatch, InjectedOOM(above=2))
    assert _train(tmp_path / "out", tiny_llama, _data(tmp_path / "d.jsonl")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the bar
    assert len(errors) == 1 and "ran out of memory training lora at batch 8" in errors[0], errors
    assert "--auto-batch" in errors[0] and "Traceback" not in errors[0]


def test_train_auto_batch_halves_to_what_fits(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    injected = _inject(monkeypatch, InjectedOOM(above=1))
    assert (
        _train(tmp_path / "out", tiny_llama, _data(tmp_path / "d.jsonl"), "--auto-batch", "--save-every", "0")
        == 0
    )
    plan = json.loads((tmp_path / "out" / "metrics.json").read_text())["memory_plan"]
    assert (plan["micro_batch"], plan["accumulation"], plan["out_of_memory"]) == (1, 8, 3)
    assert injected.raised == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-memory", "0.00001"], "lora does not fit: needs about"),
        (["--max-memory", "0"], "--max-memory 0.0: give the GiB"),
    ],
)
def test_train_max_memory_refuses_before_training(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert _train(tmp_path / "out", tiny_llama, _data(tmp_path / "d.jsonl"), *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
