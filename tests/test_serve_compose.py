"""``peftlab serve`` composing adapters per request (``"model": "a+b"`` runs that row through
``Stack("a", "b")``) and loading adapters on demand (``--max-loaded-adapters``, least recently
used first out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peftlab import PeftModel, Stack
from serve_helpers import PROMPTS, alone, concurrently, engine_for, serving, tokenizer

# ``folders`` (the four adapters saved) and ``reference`` (them loaded) are conftest's fixtures
COMPOSED = ("lora+ia3", "bn+lora", "prefix+lora+ia3", "ia3+bn+prefix")


def with_stack(model: PeftModel, name: str, prompt: str, max_tokens: int) -> str:
    """The text greedy ``generate`` gives for ``prompt`` with ``set_adapter(Stack(*parts))`` alone."""
    ids = tokenizer()(prompt)["input_ids"]
    new, _ = alone(model, Stack(*name.split("+")), ids, max_tokens)  # type: ignore[arg-type]
    return str(tokenizer().decode(new, skip_special_tokens=True))


def text(body: Any) -> str:
    return str(body["choices"][0]["text"])


# ---- composition per request ---------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_composed_model_equals_set_adapter_with_the_stack(
    folders: dict[str, Path], reference: PeftModel, batching: str
) -> None:
    """Composed rows, single-adapter rows and base rows in the same batches: each composed row's
    greedy output is the Stack's alone, each other row's its adapter's alone."""
    engine = engine_for(folders, ("lora", "ia3", "bn", "prefix"), batching=batching, max_wait_ms=200)
    plan = [(model, PROMPTS[i % len(PROMPTS)]) for i, model in enumerate([*COMPOSED, "lora", "tiny-llama"])]
    with serving(engine) as client:
        results = concurrently([lambda m=m, p=p: client.complete(m, p, max_tokens=6) for m, p in plan])
        status, chat = client.chat("lora+ia3", [{"role": "user", "content": "w5 w6"}], max_tokens=5)
    for (model, prompt), (status_code, body) in zip(plan, results, strict=True):
        assert status_code == 200, body
        assert body["model"] == model
        if "+" in model:
            assert text(body) == with_stack(reference, model, prompt, 6), model
    assert engine.stats.mixed_batches > 0
    assert status == 200, chat
    rendered = tokenizer().apply_chat_template(
        [{"role": "user", "content": "w5 w6"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer()(rendered, add_special_tokens=False)["input_ids"]
    new, _ = alone(reference, Stack("lora", "ia3"), ids, 5)  # type: ignore[arg-type]
    assert chat["choices"][0]["message"]["content"] == tokenizer().decode(new, skip_special_tokens=True)


def test_composed_names_that_cannot_run_are_refused(folders: dict[str, Path]) -> None:
    with serving(engine_for(folders, ("lora", "ia3"))) as client:
        status, body = client.complete("lora+nope", PROMPTS[0], max_tokens=2)
        assert status == 404 and "'nope'" in body["error"]["message"]
        assert body["error"]["param"] == "model"
        status, body = client.chat("nope+ia3", [{"role": "user", "content": "w5"}], max_tokens=2)
        assert status == 404 and "'nope'" in body["error"]["message"]
        status, body = client.complete("lora+lora", PROMPTS[0], max_tokens=2)
        assert status == 400 and "repeat" in body["error"]["message"], body
        status, body = client.complete("tiny-llama+lora", PROMPTS[0], max_tokens=2)
        assert status == 400 and "base model" in body["error"]["message"], body
        status, body = client.complete("lora+", PROMPTS[0], max_tokens=2)
        assert status == 400 and "empty" in body["error"]["message"], body
        assert client.complete("lora+ia3", PROMPTS[0], max_tokens=2)[0] == 200  # still serving
