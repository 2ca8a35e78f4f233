"""``peftlab serve`` composing adapters per request (``"model": "a+b"`` runs that row through
``Stack("a", "b")``) and loading adapters on demand (``--max-loaded-adapters``, least recently
used first out)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peftlab import PeftModel, Stack
from peftlab.cli import main
from peftlab.serving import Engine
from serve_helpers import (
    BASE,
    PROMPTS,
    Client,
    alone,
    concurrently,
    engine_for,
    offline,
    serving,
    slowed,
    tokenizer,
    wait_for,
)

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


# ---- adapters on demand --------------------------------------------------------------------------
def adapter_root(tmp_path: Path, folders: dict[str, Path]) -> Path:
    """A fresh --adapter-dir holding a copy of every adapter folder."""
    root = tmp_path / "root"
    for name, folder in folders.items():
        shutil.copytree(folder, root / name)
    return root


def on_demand(folders: dict[str, Path], root: Path, names: tuple[str, ...], limit: int, **kw: Any) -> Engine:
    engine: Engine = engine_for(folders, names, adapter_dirs=[str(root)], max_loaded_adapters=limit, **kw)
    return engine


def samples(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, text = client.request("GET", "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def loads(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str = "ok") -> float:
    return got.get(("peftlab_adapter_loads_total", (("outcome", outcome), ("trigger", "on_demand"))), 0)


def test_a_request_loads_an_adapter_folder_on_demand(
    folders: dict[str, Path], reference: PeftModel, tmp_path: Path
) -> None:
    engine = on_demand(folders, adapter_root(tmp_path, folders), ("lora",), 3)
    with serving(engine) as client:
        assert list(engine.adapters) == ["lora"]
        status, body = client.complete("ia3", PROMPTS[0], max_tokens=6)
        assert status == 200 and text(body) == offline(reference, "ia3", PROMPTS[0], 6)
        status, body = client.complete("lora+bn", PROMPTS[1], max_tokens=6)  # a part on demand
        assert status == 200 and text(body) == with_stack(reference, "lora+bn", PROMPTS[1], 6)
        status, body = client.chat("ia3", [{"role": "user", "content": "w5"}], max_tokens=3)
        assert status == 200
        _, _, listed = client.request("GET", "/v1/models")
        assert {m["id"] for m in listed["data"]} == {BASE, "lora", "ia3", "bn"}
        status, body = client.complete("nope", PROMPTS[0], max_tokens=2)  # no such folder: as before
        assert status == 404 and "'nope'" in body["error"]["message"]
        status, body = client.complete("lora+nope", PROMPTS[0], max_tokens=2)
        assert status == 404 and "'nope'" in body["error"]["message"]
        got = samples(client)
    assert loads(got) == 2 and loads(got, "error") == 0
    assert got[("peftlab_adapter_load_seconds_count", ())] == 2
    assert got[("peftlab_adapter_load_seconds_sum", ())] > 0
    assert got[("peftlab_adapter_evictions_total", ())] == 0
    assert got[("peftlab_loaded_adapters", ())] == 3


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_concurrent_requests_for_one_unloaded_adapter_load_it_once(
    folders: dict[str, Path],
    reference: PeftModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    batching: str,
) -> None:
    engine = on_demand(folders, adapter_root(tmp_path, folders), (), 2, batching=batching)
    calls: list[str] = []
    load = engine._load

    def slow_load(name: str, path: str | None) -> None:
        calls.append(name)
        time.sleep(0.3)  # the other requests arrive while it loads
        load(name, path)

    monkeypatch.setattr(engine, "_load", slow_load)
    with serving(engine) as client:
        results = concurrently([lambda p=p: client.complete("bn", p, max_tokens=5) for p in PROMPTS * 2])
        got = samples(client)
    for prompt, (status, body) in zip(PROMPTS * 2, results, strict=True):
        assert status == 200 and text(body) == offline(reference, "bn", prompt, 5)
    assert calls == ["bn"]
    assert loads(got) == 1


def test_the_least_recently_used_idle_adapter_is_evicted(
    folders: dict[str, Path], reference: PeftModel, tmp_path: Path
) -> None:
    engine = on_demand(folders, adapter_root(tmp_path, folders), (), 2)
    with serving(engine) as client:

        def ask(name: str) -> None:
            status, body = client.complete(name, PROMPTS[2], max_tokens=4)
            assert status == 200 and text(body) == offline(reference, name, PROMPTS[2], 4), name

        ask("ia3")
        ask("bn")
        assert set(engine.adapters) == {"ia3", "bn"}
        ask("ia3")  # bn is now the least recently used
        ask("prefix")
        assert set(engine.adapters) == {"ia3", "prefix"}
        ask("lora")
        assert set(engine.adapters) == {"prefix", "lora"}
        ask("bn")  # loaded again after its eviction
        assert set(engine.adapters) == {"lora", "bn"}
        assert set(engine.model.peft_config) == {"lora", "bn"}
        got = samples(client)
    assert loads(got) == 5
    assert got[("peftlab_adapter_evictions_total", ())] == 3
    assert got[("peftlab_loaded_adapters", ())] == 2


def test_adapters_named_at_startup_count_and_stay(folders: dict[str, Path], tmp_path: Path) -> None:
    engine = on_demand(folders, adapter_root(tmp_path, folders), ("lora",), 2)
    with serving(engine) as client:
        for name in ("ia3", "bn", "prefix"):
            assert client.complete(name, PROMPTS[0], max_tokens=2)[0] == 200
            assert set(engine.adapters) == {"lora", name}
    one = on_demand(folders, adapter_root(tmp_path / "one", folders), ("lora",), 1)
    with serving(one) as client:
        status, body = client.complete("ia3", PROMPTS[0], max_tokens=2)
        assert status == 409 and "DELETE /v1/adapters" in body["error"]["message"], body
        status, body = client.complete("lora+ia3", PROMPTS[0], max_tokens=2)  # can never be loaded
        assert status == 400 and "at most 1 loaded" in body["error"]["message"], body
        assert client.complete("lora", PROMPTS[0], max_tokens=2)[0] == 200


def test_an_adapter_in_use_is_not_evicted(
    folders: dict[str, Path], reference: PeftModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = on_demand(folders, adapter_root(tmp_path, folders), (), 2)
    with serving(engine) as client:
        assert client.complete("ia3", PROMPTS[0], max_tokens=2)[0] == 200
        assert client.complete("bn", PROMPTS[0], max_tokens=2)[0] == 200
        slowed(monkeypatch, engine, 0.05)
        long: list[tuple[int, Any]] = []
        running = threading.Thread(
            target=lambda: long.append(client.complete("ia3", PROMPTS[1], max_tokens=30))
        )
        running.start()
        wait_for(lambda: engine.running_rows == 1)
        assert client.complete("bn", PROMPTS[0], max_tokens=2)[0] == 200  # ia3, running, is now the LRU
        status, body = client.complete("prefix", PROMPTS[3], max_tokens=4)
        assert status == 200 and text(body) == offline(reference, "prefix", PROMPTS[3], 4)
        assert set(engine.adapters) == {"ia3", "prefix"}  # bn went, not the running ia3
        running.join()
    ((status, body),) = long
    assert status == 200 and text(body) == offline(reference, "ia3", PROMPTS[1], 30)


def test_no_idle_slot_is_a_503_with_retry_after(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = on_demand(folders, adapter_root(tmp_path, folders), (), 1)
    with serving(engine) as client:
        assert client.complete("ia3", PROMPTS[0], max_tokens=2)[0] == 200
        slowed(monkeypatch, engine, 0.05)
        running = threading.Thread(target=lambda: client.complete("ia3", PROMPTS[1], max_tokens=20))
        running.start()
        wait_for(lambda: engine.running_rows == 1)
        status, head, body = client.request(
            "POST", "/v1/completions", {"model": "bn", "prompt": PROMPTS[0], "max_tokens": 2}
        )
        running.join()
        assert status == 503 and "--max-loaded-adapters" in body["error"]["message"]
        assert int(head["retry-after"]) >= 1
        assert client.complete("bn", PROMPTS[0], max_tokens=2)[0] == 200  # ia3 idle now: evicted


def test_a_folder_that_fails_to_load_fails_its_requests_only(
    folders: dict[str, Path], reference: PeftModel, tmp_path: Path
) -> None:
    root = adapter_root(tmp_path, folders)
    shutil.copytree(folders["lora"], root / "broken")
    weights = root / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut short
    shutil.copytree(folders["ia3"], root / "noweights")
    (root / "noweights" / "adapter_model.safetensors").unlink()
    (root / "escape").symlink_to(folders["bn"], target_is_directory=True)  # outside the root
    engine = on_demand(folders, root, ("lora",), 3)
    with serving(engine) as client:
        calls = [lambda: client.complete("broken", PROMPTS[0], max_tokens=4) for _ in range(2)]
        calls += [lambda p=p: client.complete("lora", p, max_tokens=6) for p in PROMPTS]
        calls += [lambda p=p: client.complete("ia3", p, max_tokens=6) for p in PROMPTS]
        results = concurrently(calls)
        for status, body in results[:2]:
            assert status == 500 and "'broken' failed to load" in body["error"]["message"], body
        for (status, body), (name, prompt) in zip(
            results[2:], [("lora", p) for p in PROMPTS] + [("ia3", p) for p in PROMPTS], strict=True
        ):
            assert status == 200 and text(body) == offline(reference, name, prompt, 6)
        status, body = client.complete("noweights", PROMPTS[0], max_tokens=2)
        assert status == 400 and "adapter_model.safetensors" in body["error"]["message"]
        status, body = client.complete("escape", PROMPTS[0], max_tokens=2)
        assert status == 403
        assert set(engine.adapters) == {"lora", "ia3"}
        assert "broken" not in engine.model.peft_config
        assert client.complete("lora+ia3", PROMPTS[0], max_tokens=2)[0] == 200  # still serving
        got = samples(client)
    assert loads(got, "error") >= 1 and loads(got) == 1


def test_a_limit_below_the_startup_adapters_is_refused_at_start(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(folders["lora"].parent)
    argv = ["serve", "--adapter", f"a={folders['lora']}", "--adapter", f"b={folders['ia3']}"]
    assert main([*argv, "--adapter-dir", root, "--max-loaded-adapters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-loaded-adapters 1 is smaller than the 2 adapters named at start-up (a, b)" in err
    assert len(err.splitlines()) == 1
    assert main([*argv, "--max-loaded-adapters", "2"]) == 2  # nowhere to load from
    assert "--adapter-dir" in capsys.readouterr().err
    with pytest.raises(ValueError, match="smaller than the 2 adapters"):
        engine_for(folders, ("lora", "ia3"), adapter_dirs=[root], max_loaded_adapters=1)
