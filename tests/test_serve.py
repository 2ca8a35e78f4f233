"""``peftlab serve`` over real HTTP on loopback: a tiny llama, a word-level tokenizer and adapters
of four methods saved to folders. Outputs are checked against offline ``generate`` with each
adapter alone; batching (continuous and static), streaming, errors, the full queue, the API key
and loading/unloading adapters under concurrent requests are exercised through the server.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import build_model
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.cli import main
from peftlab.serving import Engine
from serve_helpers import (
    BASE,
    PROMPTS,
    Client,
    concurrently,
    engine_for,
    free_port,
    offline,
    serving,
    tokenizer,
    wait_for,
    wait_until_serving,
)

# ``folders`` (the four adapters saved) and ``reference`` (them loaded) are conftest's fixtures


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[tuple[Client, Engine]]:
    """lora, ia3, bn on the server from the start; prefix is loaded at run time by the tests
    (from the folder all four were saved in, the server's one adapter root)."""
    start = ("lora", "ia3", "bn")
    engine = engine_for(
        folders,
        start,
        max_batch_size=8,
        max_queue=64,
        adapter_paths={k: str(folders[k]) for k in start},
        adapter_dirs=[str(folders["prefix"].parent)],
    )
    with serving(engine) as client:
        yield client, engine


def expected(reference: PeftModel, adapter: str, prompt: str, max_tokens: int) -> str:
    return offline(reference, adapter, prompt, max_tokens)


# ---- correctness ----------------------------------------------------------------------------
def test_models_and_health(server: tuple[Client, Engine]) -> None:
    client, _ = server
    status, _, body = client.request("GET", "/v1/models")
    assert status == 200
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) >= {BASE, "lora", "ia3", "bn"}
    assert ids["lora"]["method"] == "LORA" and ids["lora"]["parent"] == BASE
    assert ids["bn"]["method"] == "BOTTLENECK"
    status, _, health = client.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == BASE
    assert health["batching"] == "continuous"


def test_each_adapter_equals_offline_generate(server: tuple[Client, Engine], reference: PeftModel) -> None:
    client, _ = server
    outputs = {}
    for adapter in (BASE, "lora", "ia3", "bn"):
        status, body = client.complete(adapter, PROMPTS[:2], max_tokens=6)
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == adapter
        assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
        texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
        assert texts == [expected(reference, adapter, p, 6) for p in PROMPTS[:2]], adapter
        usage = body["usage"]
        n_prompt = sum(len(p.split()) for p in PROMPTS[:2])
        assert usage["prompt_tokens"] == n_prompt
        assert usage["total_tokens"] == n_prompt + usage["completion_tokens"]
        assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
        outputs[adapter] = texts
    # every adapter really changes what the model says
    for adapter in ("lora", "ia3", "bn"):
        assert outputs[adapter] != outputs[BASE] and any(outputs[adapter]), adapter


def mixed_plan(reference: PeftModel) -> tuple[list[tuple[str, str, int]], str, str]:
    """Requests for every adapter and the base with different lengths, and a stop string taken
    from the middle of what one request would say without it (with the text it leaves)."""
    plan = [("lora", PROMPTS[0], 7), ("ia3", PROMPTS[1], 3), (BASE, PROMPTS[2], 5), ("bn", PROMPTS[3], 6)]
    plan += [("lora", PROMPTS[3], 4), ("bn", PROMPTS[0], 8)]
    full = expected(reference, "lora", PROMPTS[0], 8).split(" ")
    cut = next(k for k in range(1, len(full)) if full[k] not in full[:k])
    return plan, " " + full[cut], " ".join(full[:cut])


def check_mixed(
    client: Client, reference: PeftModel, plan: list[tuple[str, str, int]], stop: str, left: str
) -> None:
    results = concurrently(
        [lambda a=a, p=p, m=m: client.complete(a, p, max_tokens=m) for a, p, m in plan]
        + [lambda: client.complete("lora", PROMPTS[0], max_tokens=8, stop=[stop, "w999"])]
    )
    for (adapter, prompt, max_tokens), (status, body) in zip(plan, results, strict=False):
        assert status == 200, body
        assert body["choices"][0]["text"] == expected(reference, adapter, prompt, max_tokens), adapter
        assert body["usage"]["completion_tokens"] <= max_tokens
    status, body = results[-1]
    assert body["choices"][0]["text"] == left
    assert body["choices"][0]["finish_reason"] == "stop"


def test_mixed_adapters_share_decoding_steps_and_equal_solo(
    server: tuple[Client, Engine], reference: PeftModel
) -> None:
    client, engine = server
    plan, stop, left = mixed_plan(reference)
    before = engine.stats.to_dict()
    check_mixed(client, reference, plan, stop, left)
    after = engine.stats.to_dict()
    assert after["mixed_batches"] > before["mixed_batches"], (before, after)
    assert after["max_batch_rows"] >= 3


@pytest.fixture(scope="module")
def static_server(folders: dict[str, Path]) -> Iterator[tuple[Client, Engine]]:
    engine = engine_for(
        folders,
        ("lora", "ia3", "bn"),
        batching="static",
        max_batch_size=8,
        max_wait_ms=3000,  # long enough for every concurrent request to arrive
    )
    with serving(engine) as client:
        yield client, engine


def test_static_batching_runs_mixed_adapters_in_one_generate_call(
    static_server: tuple[Client, Engine], reference: PeftModel
) -> None:
    client, engine = static_server
    plan, stop, left = mixed_plan(reference)
    engine.max_batch_size = len(plan) + 1
    check_mixed(client, reference, plan, stop, left)
    stats = engine.stats.to_dict()
    assert stats["batches"] == 1 and stats["rows"] == len(plan) + 1
    assert stats["mixed_batches"] == 1 and stats["max_batch_rows"] == len(plan) + 1


def test_sampling_with_a_seed_does_not_depend_on_the_batch(server: tuple[Client, Engine]) -> None:
    client, _ = server
    kw = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.95}
    _, solo = client.complete("lora", PROMPTS[0], seed=7, **kw)
    results = concurrently(
        [
            lambda: client.complete("lora", PROMPTS[0], seed=7, **kw),
            lambda: client.complete("bn", PROMPTS[1], seed=1, **kw),
            lambda: client.complete("lora", PROMPTS[0], seed=8, **kw),
            lambda: client.complete(BASE, PROMPTS[2], max_tokens=6),
        ]
    )
    text = solo["choices"][0]["text"]
    assert results[0][1]["choices"][0]["text"] == text
    assert results[2][1]["choices"][0]["text"] != text  # another seed, another sample
    _, greedy = client.complete("lora", PROMPTS[0], max_tokens=10)
    assert greedy["choices"][0]["text"] != text


def test_streaming_sends_the_same_text(server: tuple[Client, Engine], reference: PeftModel) -> None:
    client, _ = server
    body = {"model": "bn", "prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    status, head, text = client.request("POST", "/v1/completions", body)
    assert status == 200 and head["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    got = {0: "", 1: ""}
    pieces = {0: 0, 1: 0}
    finish = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        got[choice["index"]] += choice["text"]
        pieces[choice["index"]] += bool(choice["text"])
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    want = {i: expected(reference, "bn", p, 6) for i, p in enumerate(PROMPTS[:2])}
    assert got == want
    assert set(finish) == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 6
    # text came word by word, not all at the end
    assert pieces == {i: len(want[i].split()) for i in (0, 1)}


# ---- bad input ------------------------------------------------------------------------------
def test_errors_are_4xx_with_clear_messages(server: tuple[Client, Engine]) -> None:
    client, engine = server

    def err(status_body: tuple[int, Any], status: int, *words: str) -> None:
        code, body = status_body
        assert code == status, body
        message = body["error"]["message"]
        for word in words:
            assert word in message, message

    post = client.request
    err(post("POST", "/v1/completions", raw=b'{"model": "lora", "prompt": ')[::2], 400, "not valid JSON")
    err(post("POST", "/v1/completions", {"prompt": "w5"})[::2], 422, "missing field 'model'")
    err(post("POST", "/v1/completions", {"model": "lora", "prompt": 5})[::2], 422, "'prompt'")
    err(post("POST", "/v1/completions", raw=b"[1, 2]")[::2], 422, "JSON object")
    err(client.complete("nope", "w5"), 404, "'nope'", BASE, "lora", "ia3")
    err(client.complete("lora", " ".join(["w7"] * 70)), 400, "70 tokens", "at most 63")
    err(client.complete("lora", "w5 w6", max_tokens=0), 400, "max_tokens must be between 1 and 64")
    err(client.complete("lora", "w5 w6", max_tokens=65), 400, "max_tokens must be between 1 and 64")
    err(client.complete("lora", " ".join(["w7"] * 60), max_tokens=10), 400, "context length of 64")
    err(client.complete("lora", ""), 400, "empty")
    err(client.complete("lora", []), 400, "empty list")
    err(client.complete("lora", "w5", temperature=3), 400, "temperature")
    err(client.complete("lora", "w5", n=2), 400, "n must be 1")
    err(client.complete("lora", "w5", stop=["a", "b", "c", "d", "e"]), 400, "stop")
    err(post("GET", "/v1/nothing")[::2], 404, "no route")
    assert engine.stats.to_dict()["rejected_queue_full"] == 0


def test_adapter_loading_errors(server: tuple[Client, Engine], folders: dict[str, Path]) -> None:
    client, _ = server
    # bad folders inside the server's adapter root (outside it, everything is 403: test_serve_ops)
    tmp_path = folders["prefix"].parent / "bad"
    tmp_path.mkdir()

    def load(name: str, path: Path | str) -> tuple[int, str]:
        status, _, body = client.request("POST", "/v1/adapters", {"name": name, "path": str(path)})
        return status, body["error"]["message"] if status != 200 else ""

    status, message = load("x", tmp_path / "missing")
    assert status == 400 and "does not exist" in message
    (tmp_path / "file").write_text("x")
    assert load("x", tmp_path / "file")[0] == 400
    (tmp_path / "empty").mkdir()
    status, message = load("x", tmp_path / "empty")
    assert status == 400 and "adapter_config.json" in message
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folders["lora"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04.")
    status, message = load("x", pickled)
    assert status == 400 and "safetensors" in message
    status, message = load("a.b", folders["prefix"])
    assert status == 400 and "letters, digits" in message
    assert load(BASE, folders["prefix"])[0] == 400
    assert load("lora", folders["prefix"])[0] == 409
    # an adapter trained on another architecture does not fit: 400, and the model is unchanged
    gpt2 = tmp_path / "gpt2"
    get_peft_model(build_model("gpt2"), LoraConfig(r=2)).save_pretrained(gpt2)
    status, message = load("g", gpt2)
    assert status == 400 and "does not fit" in message, message
    status, _, body = client.request("DELETE", "/v1/adapters/g")
    assert status == 404 and "no adapter named 'g'" in body["error"]["message"]
    assert client.request("GET", "/health")[2]["adapters"] == ["lora", "ia3", "bn"]


# ---- loading and unloading while serving ----------------------------------------------------
def test_hot_load_and_unload_under_concurrent_requests(
    server: tuple[Client, Engine], folders: dict[str, Path], reference: PeftModel
) -> None:
    client, _ = server
    want = {a: expected(reference, a, PROMPTS[1], 5) for a in ("lora", BASE, "prefix")}
    stop = threading.Event()
    answers: list[tuple[str, int, Any]] = []

    def hammer(adapter: str) -> None:
        while not stop.is_set():
            status, body = client.complete(adapter, PROMPTS[1], max_tokens=5)
            answers.append((adapter, status, body))

    workers = [threading.Thread(target=hammer, args=(a,)) for a in ("lora", BASE, "prefix", "prefix")]
    for w in workers:
        w.start()
    try:
        for _ in range(2):
            status, _, body = client.request(
                "POST", "/v1/adapters", {"name": "prefix", "path": str(folders["prefix"])}
            )
            assert status == 200 and body["method"] == "PREFIX_TUNING", body
            status, body = client.complete("prefix", PROMPTS[1], max_tokens=5)
            assert status == 200 and body["choices"][0]["text"] == want["prefix"]
            time.sleep(0.2)
            status, _, body = client.request("DELETE", "/v1/adapters/prefix")
            assert status == 200 and body["deleted"], body
            time.sleep(0.1)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert len(answers) > 20
    for adapter, status, body in answers:
        if status == 200:
            assert body["choices"][0]["text"] == want[adapter], adapter
        else:
            # only the adapter that comes and goes may be missing, and it says so
            assert adapter == "prefix" and status == 404, (adapter, status, body)
            assert "prefix" in body["error"]["message"]
    assert any(a == "prefix" and s == 200 for a, s, _ in answers)
    assert {a for a, s, _ in answers if s == 200} == {"lora", BASE, "prefix"}
    status, _, body = client.request("GET", "/v1/models")
    assert "prefix" not in {m["id"] for m in body["data"]}


def _blocked(engine: Engine) -> threading.Event:
    """Occupy the model worker until the returned event is set, so requests pile up in the queue."""
    release = threading.Event()
    engine.run_on_worker(release.wait, 30)
    return release


def test_unload_waits_for_requests_queued_before_it(
    server: tuple[Client, Engine], folders: dict[str, Path], reference: PeftModel
) -> None:
    client, engine = server
    status, _, _ = client.request("POST", "/v1/adapters", {"name": "prefix", "path": str(folders["prefix"])})
    assert status == 200
    release = _blocked(engine)
    with ThreadPoolExecutor(5) as pool:
        plug = pool.submit(client.complete, "lora", PROMPTS[3], max_tokens=2)
        wait_for(lambda: engine.running_rows == 1)  # the worker is busy: what follows waits in the queue
        early = [pool.submit(client.complete, "prefix", p, max_tokens=4) for p in PROMPTS[:2]]
        wait_for(lambda: engine.queue_depth() == 2)
        delete = pool.submit(client.request, "DELETE", "/v1/adapters/prefix")
        wait_for(lambda: engine.queue_depth() == 3)
        late = pool.submit(client.complete, "prefix", PROMPTS[0], max_tokens=4)
        wait_for(lambda: engine.queue_depth() == 4)
        release.set()
        assert plug.result()[0] == 200
        for future, prompt in zip(early, PROMPTS[:2], strict=True):
            status, body = future.result()
            assert status == 200, body
            assert body["choices"][0]["text"] == expected(reference, "prefix", prompt, 4)
        assert delete.result()[0] == 200
        status, body = late.result()
        assert status == 404 and "unloaded before this request ran" in body["error"]["message"]


# ---- limits and the API key on a small server ---------------------------------------------------
@pytest.fixture(scope="module")
def small(folders: dict[str, Path]) -> Iterator[tuple[Client, Engine]]:
    engine = engine_for(folders, ("ia3",), max_batch_size=1, max_queue=2)
    with serving(engine, api_key="s3cret") as client:
        yield client, engine


def test_api_key_is_checked_on_every_request(small: tuple[Client, Engine]) -> None:
    client, _ = small
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        conn = http.client.HTTPConnection(client.host, client.port, timeout=30)
        conn.request(method, path, body=b"{}")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 401 and resp.getheader("WWW-Authenticate") == "Bearer"
        assert "API key" in body["error"]["message"]
        assert client.request(method, path, {}, key="wrong")[0] == 401
    assert client.request("GET", "/health")[0] == 200
    assert client.complete("ia3", "w5 w6", max_tokens=2)[0] == 200


def test_full_queue_gets_503_with_retry_after(small: tuple[Client, Engine]) -> None:
    client, engine = small
    release = _blocked(engine)
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(client.complete, "ia3", "w5 w6", max_tokens=2)]
        wait_for(lambda: engine.running_rows == 1)  # taken by the (blocked) worker
        waiting += [pool.submit(client.complete, "ia3", "w5 w6", max_tokens=2) for _ in range(2)]
        wait_for(lambda: engine.queue_depth() == 2)
        status, head, body = client.request(
            "POST", "/v1/completions", {"model": "ia3", "prompt": "w5", "max_tokens": 2}
        )
        assert status == 503 and int(head["retry-after"]) >= 1
        assert "busy" in body["error"]["message"]
        release.set()
        assert [f.result()[0] for f in waiting] == [200, 200, 200]  # queued ones are not dropped
    assert engine.stats.to_dict()["rejected_queue_full"] == 1


# ---- the command line ----------------------------------------------------------------------
def test_cli_refuses_bad_adapter_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folders: dict[str, Path]
) -> None:
    assert main(["serve", "--adapter", f"x={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"a={folders['lora']}", "--adapter", f"a={folders['ia3']}"]) == 2
    assert "more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--adapter", "no-equals-sign"])
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--adapter-dir", str(tmp_path / "nowhere")]) == 2
    assert "--adapter-dir" in capsys.readouterr().err


def test_cli_serves_over_http(tmp_path: Path, folders: dict[str, Path], reference: PeftModel) -> None:
    base = tmp_path / "tiny"
    build_model("llama").save_pretrained(base)
    tokenizer().save_pretrained(base)
    port = free_port()
    env = {**os.environ, "PEFTLAB_API_KEY": "k", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "peftlab", "serve", "--model", str(base), "--port", str(port)]
    cmd += ["--adapter", f"bn={folders['bn']}", "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = Client(f"http://127.0.0.1:{port}", api_key="k")
        wait_until_serving(proc, client, timeout=60)
        status, body = client.complete("bn", PROMPTS[0], max_tokens=5)
        assert status == 200 and body["choices"][0]["text"] == expected(reference, "bn", PROMPTS[0], 5)
        assert client.complete("tiny", PROMPTS[0], max_tokens=5)[1]["choices"][0]["text"] == expected(
            reference, BASE, PROMPTS[0], 5
        )
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
