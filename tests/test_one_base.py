"""compare keeps one copy of the base: every method's adapter goes into the loaded base and comes
out again, leaving the base bit for bit as loaded (a quantized base too), while full fine-tuning
trains the weights loaded again from disk; a paused adapter set aside and put back goes on
exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import build_model, sample_inputs
from peftlab import LoraConfig, get_peft_model
from peftlab.compare.inputs import load_inputs
from peftlab.compare.options import CompareOptions, resolve_options
from peftlab.compare.session import EarlyStopping, Session
from peftlab.presets import PRESETS


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
    }


def _assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["dtypes"] == before["dtypes"] and after["trainable"] == before["trainable"] == []
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in after["tensors"].items() if not torch.equal(v, before["tensors"][k])]
    assert changed == []


@pytest.fixture(scope="module")
def session(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Session:
    import json

    from conftest import WORDS

    data = tmp_path_factory.mktemp("one-base") / "d.jsonl"
    rows = [{"prompt": f"q {a} {b} :", "completion": f" ans {a}"} for a in WORDS[:6] for b in WORDS[:6]]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    opts = CompareOptions(model=str(tiny_llama), data=str(data), quick=True, dtype="float32", device="cpu")
    return Session(load_inputs(resolve_options(opts)))


def _train(session: Session, model: nn.Module, stop_at: int | None = None) -> Any:
    stopper = EarlyStopping(model, 100)
    return session.train(model, 1e-2, 0, budget=16, on_validation=stopper, desc="t", stop_at=stop_at)


@pytest.mark.parametrize("method", ["lora", "lora-all", "ia3", "bottleneck", "prefix"])
def test_every_adapter_leaves_the_base_as_loaded(session: Session, method: str) -> None:
    base = session.inputs.base
    before = _snapshot(base)
    model, peft = session.prepare(PRESETS[method], seed=0)
    assert peft is not None and peft.base_model is base  # no copy: the adapter is in the base itself
    _train(session, model)
    out = session.evaluate_test(model)
    assert out.metrics["eval_loss"] > 0
    session.release()
    _assert_same(base, before)


def test_a_paused_adapter_set_aside_goes_on_exactly(session: Session) -> None:
    """A search trial paused, another trial in the base meanwhile, the first put back and resumed:
    the same as one uninterrupted run."""
    lora = PRESETS["lora"]
    straight, _ = session.prepare(lora, seed=0)
    whole = _train(session, straight)
    session.release()

    paused_model, paused = session.prepare(lora, seed=0)
    outcome = _train(session, paused_model, stop_at=8)
    assert outcome.reason == "paused"
    other, _ = session.prepare(PRESETS["ia3"], seed=0)  # sets the paused adapter aside
    _train(session, other)
    session.activate(paused)
    resumed = session.resume(outcome, paused_model, on_validation=EarlyStopping(paused_model, 100), desc="r")
    session.release()
    assert resumed.history.losses == whole.history.losses


def test_full_fine_tuning_trains_weights_loaded_again(session: Session) -> None:
    base = session.inputs.base
    before = _snapshot(base)
    model, peft = session.prepare(PRESETS["full"], seed=0)
    assert peft is None and model is not base
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    )
    _train(session, model)
    session.release()
    _assert_same(base, before)


def test_a_quantized_base_is_restored_too(session: Session) -> None:
    pytest.importorskip("bitsandbytes")
    quantized = session.bases.quantized_base("nf4")
    before = _snapshot(quantized)
    model, peft = session.prepare(PRESETS["qlora"], seed=0)
    assert peft is not None and peft.base_model is quantized
    norms = [p.dtype for n, p in quantized.named_parameters() if "norm" in n]
    assert norms and all(d == torch.float32 for d in norms)  # k-bit preparation while it trains
    assert quantized.get_input_embeddings()._forward_hooks
    _train(session, model)
    session.release()
    _assert_same(quantized, before)
    assert not quantized.get_input_embeddings()._forward_hooks  # k-bit preparation's hook removed


def test_detach_and_attach() -> None:
    base = build_model("llama")
    inputs = sample_inputs("llama")
    plain = base(**inputs).logits.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False))
    adapted = model(**inputs).logits.detach().clone()
    assert not torch.allclose(adapted, plain)
    assert model.detach() is base and not model.is_attached
    torch.testing.assert_close(base(**inputs).logits, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="detached from its base; call attach"):
        model(**inputs)
    model.attach()
    torch.testing.assert_close(model(**inputs).logits, adapted, rtol=0, atol=0)
