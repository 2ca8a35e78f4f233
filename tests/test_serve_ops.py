"""``peftlab serve`` in production: adapter loading confined to the ``--adapter-dir`` roots, bounded
request bodies, the warning for an open port without a key, Prometheus metrics, clients that
leave mid-request, bad input under concurrent load, and SIGTERM on a real server process."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peftlab import PeftModel
from peftlab.serving import Engine, startup_warnings
from peftlab.serving.jobs import Job
from serve_helpers import (
    BASE,
    PROMPTS,
    Client,
    concurrently,
    engine_for,
    offline,
    serve_process,
    serving,
    slowed,
    tokenizer,
    wait_for,
)

# ``folders`` (the four adapters saved) and ``reference`` (them loaded) are conftest's fixtures


def jobs_of(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> list[Job]:
    """The jobs the engine is given from now on."""
    jobs: list[Job] = []
    submit = engine.submit

    def record(*args: Any, **kwargs: Any) -> Job:
        job = submit(*args, **kwargs)
        jobs.append(job)
        return job

    monkeypatch.setattr(engine, "submit", record)
    return jobs


# ---- adapter loading confined to the roots ---------------------------------------------------
def load(client: Client, name: str, path: Path | str) -> tuple[int, str]:
    status, _, body = client.request("POST", "/v1/adapters", {"name": name, "path": str(path)})
    return status, "" if status == 200 else body["error"]["message"]


def test_run_time_loading_is_off_without_adapter_dirs(folders: dict[str, Path]) -> None:
    with serving(engine_for(folders, ("lora",))) as client:
        status, message = load(client, "ia3", folders["ia3"])
        assert status == 403 and "--adapter-dir" in message
        status, _, body = client.request("DELETE", "/v1/adapters/lora")
        assert status == 403 and "fixed at startup" in body["error"]["message"]
        assert client.complete("lora", PROMPTS[0], max_tokens=2)[0] == 200  # still there


def test_only_folders_inside_the_roots_load(folders: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copytree(folders["ia3"], root / "ia3")
    shutil.copytree(folders["bn"], outside / "bn")  # a valid adapter folder, but not in a root
    (root / "escape").symlink_to(outside / "bn", target_is_directory=True)
    (root / "inner-link").symlink_to(root / "ia3", target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").symlink_to(outside / "bn" / "adapter_config.json")
    shutil.copy(folders["bn"] / "adapter_model.safetensors", sneaky)
    engine = engine_for(folders, ("lora",), adapter_dirs=[str(root)])
    with serving(engine) as client:
        for path in (
            outside / "bn",  # absolute, outside
            outside / "missing",  # outside and missing: 403 all the same (nothing is revealed)
            root / ".." / "outside" / "bn",  # .. out of the root
            "../outside/bn",  # relative, .. out of the root
            root / "escape",  # a link inside the root to a folder outside
            "/etc",
        ):
            status, message = load(client, "x", path)
            assert status == 403, (path, message)
            assert "outside the folders this server loads adapters from" in message and str(root) in message
        status, message = load(client, "x", sneaky)
        assert status == 403 and "link to a file outside" in message
        status, message = load(client, "x", root / "missing")
        assert status == 400 and "does not exist" in message
        assert load(client, "abs", root / "ia3") == (200, "")
        assert load(client, "rel", "ia3") == (200, "")  # relative to the root
        assert load(client, "linked", root / "inner-link") == (200, "")  # a link that stays inside
        assert load(client, "dots", root / "sneaky" / ".." / "ia3") == (200, "")
        for name in ("abs", "rel", "linked", "dots"):
            assert client.complete(name, PROMPTS[0], max_tokens=3)[0] == 200
        assert client.request("DELETE", "/v1/adapters/rel")[0] == 200
    assert set(engine.adapters) == {"lora", "abs", "linked", "dots"}


# ---- bounded requests ------------------------------------------------------------------------
def test_request_bodies_and_prompt_counts_are_bounded(folders: dict[str, Path]) -> None:
    with serving(engine_for(folders, ("lora",), max_prompts=3), max_body_bytes=2000) as client:
        big = {"model": "lora", "prompt": " ".join(["w7"] * 700)}
        status, _, body = client.request("POST", "/v1/completions", big)
        assert status == 413 and "limit of 2000 bytes" in body["error"]["message"]
        # the same without a Content-Length (chunked): refused while it is read
        conn = socket.create_connection((client.host, client.port), timeout=30)
        data = json.dumps(big).encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(data), 500):
            piece = data[i : i + 500]
            conn.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.sendall(b"0\r\n\r\n")
        reply = conn.recv(4096).decode()
        conn.close()
        assert reply.startswith("HTTP/1.1 413"), reply
        status, body = client.complete("lora", ["w5"] * 4, max_tokens=2)
        assert status == 400 and "at most 3" in body["error"]["message"]
        assert client.complete("lora", ["w5"] * 3, max_tokens=2)[0] == 200


def test_an_open_port_without_a_key_is_warned_about(folders: dict[str, Path], tmp_path: Path) -> None:
    engine = engine_for(folders, ("lora",), adapter_dirs=[str(tmp_path)])
    (warning,) = startup_warnings("0.0.0.0", None, engine)
    assert "warning" in warning and "0.0.0.0" in warning and "--api-key" in warning
    assert str(tmp_path.resolve()) in warning  # it says what else an anonymous client can do
    closed = engine_for(folders, ("lora",))  # no adapter folders: nothing to load or unload
    assert "load or unload adapters" not in startup_warnings("10.1.2.3", None, closed)[0]
    for host, key in (("127.0.0.1", None), ("localhost", None), ("::1", None), ("0.0.0.0", "k")):
        assert startup_warnings(host, key, engine) == []


# ---- metrics ---------------------------------------------------------------------------------
def samples(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, head, text = client.request("GET", "/metrics")
    assert status == 200 and head["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_in_prometheus_format(folders: dict[str, Path]) -> None:
    with serving(engine_for(folders, ("lora", "ia3"))) as client:
        results = concurrently(
            [lambda: client.complete("lora", PROMPTS[0], max_tokens=4) for _ in range(2)]
            + [lambda: client.complete(BASE, PROMPTS[1], max_tokens=3)]
            + [lambda: client.chat("ia3", [{"role": "user", "content": "w5"}], max_tokens=3)]
        )
        assert [r[0] for r in results] == [200] * 4
        assert client.complete("nope", "w5")[0] == 404  # not counted under a model name
        got = samples(client)
    requests = {k[1]: v for k, v in got.items() if k[0] == "peftlab_requests_total"}
    assert requests == {
        (("model", "lora"), ("outcome", "ok")): 2,
        (("model", BASE), ("outcome", "ok")): 1,
        (("model", "ia3"), ("outcome", "ok")): 1,
    }
    assert got[("peftlab_time_to_first_token_seconds_count", ())] == 4
    assert got[("peftlab_request_latency_seconds_count", ())] == 4
    assert (
        got[("peftlab_time_to_first_token_seconds_sum", ())]
        <= got[("peftlab_request_latency_seconds_sum", ())]
    )
    completion = sum(r[1]["usage"]["completion_tokens"] for r in results)
    assert completion <= got[("peftlab_generation_tokens_total", ())] <= completion + 4  # + the eos tokens
    assert got[("peftlab_generation_tokens_per_second", ())] > 0
    assert got[("peftlab_batch_size_count", ())] >= 1
    assert got[("peftlab_batch_size_sum", ())] >= got[("peftlab_generation_tokens_total", ())] - 4
    assert got[("peftlab_queue_depth", ())] == 0 and got[("peftlab_running_rows", ())] == 0
    prompt = sum(r[1]["usage"]["prompt_tokens"] for r in results)
    assert got[("peftlab_prompt_tokens_total", ())] == prompt


# ---- clients that leave ----------------------------------------------------------------------
def raw_request(client: Client, body: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection((client.host, client.port), timeout=30)
    data = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_client_that_leaves_frees_its_row(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, reference: PeftModel
) -> None:
    engine = engine_for(folders, ("lora", "bn"))
    slowed(monkeypatch, engine, 0.02)
    jobs = jobs_of(monkeypatch, engine)
    with serving(engine) as client:
        with InBackground(lambda: client.complete("bn", PROMPTS[1], max_tokens=40)) as kept:
            sock = raw_request(
                client, {"model": "lora", "prompt": PROMPTS[0], "max_tokens": 40, "stream": True}
            )
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(4096)
            wait_for(lambda: len(jobs) == 2)
            streamed = next(j for j in jobs if j.events is not None)
            made = len(streamed.rows[0].tokens)
            sock.close()
            wait_for(lambda: streamed.rows[0].finish_reason is not None)
            row = streamed.rows[0]
            assert row.finish_reason == "cancelled"
            assert len(row.tokens) <= made + 3  # freed at the next step or so, not after 40
            wait_for(lambda: engine.running_rows <= 1)  # its slot is free (the loop thread counts it next)
            # a non-streamed request whose client leaves is dropped too
            sock = raw_request(client, {"model": "lora", "prompt": PROMPTS[2], "max_tokens": 40})
            wait_for(lambda: len(jobs) == 3 and bool(jobs[2].rows[0].tokens))
            sock.close()
            wait_for(lambda: jobs[2].rows[0].finish_reason is not None)
            assert jobs[2].rows[0].finish_reason == "cancelled" and len(jobs[2].rows[0].tokens) < 40
        status, body = kept.result
        assert status == 200 and body["choices"][0]["text"] == offline(reference, "bn", PROMPTS[1], 40)
        got = samples(client)
    assert got[("peftlab_requests_total", (("model", "lora"), ("outcome", "cancelled")))] == 2


class InBackground:
    """Run ``call`` on a thread for the span of the block; its return value is ``.result`` after."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.result: Any = None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        self.result = self.call()

    def __enter__(self) -> InBackground:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=60)


# ---- bad input under concurrent load ---------------------------------------------------------
def test_bad_input_under_load_leaves_everyone_else_served(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, reference: PeftModel, tmp_path: Path
) -> None:
    engine = engine_for(
        folders, ("lora", "ia3", "bn", "prefix"), max_batch_size=3, max_queue=4, adapter_dirs=[str(tmp_path)]
    )
    slowed(monkeypatch, engine, 0.005)
    with serving(engine) as client:
        busy: list[str] = []

        def good(adapter: str, prompt: str) -> tuple[str, str, str]:
            for _ in range(400):
                status, head, body = client.request(
                    "POST",
                    "/v1/completions",
                    {"model": adapter, "prompt": prompt, "max_tokens": 6, "temperature": 0},
                )
                if status != 503:
                    assert status == 200, body
                    return adapter, prompt, body["choices"][0]["text"]
                assert int(head["retry-after"]) >= 1 and "busy" in body["error"]["message"]
                busy.append(adapter)
                time.sleep(0.05)  # (Retry-After says whole seconds; a test need not wait that long)
            raise AssertionError("never served")

        def bad() -> list[int]:
            statuses = []
            for _ in range(3):
                statuses.append(client.chat("missing", [{"role": "user", "content": "w5"}])[0])
                statuses.append(client.chat("lora", [{"role": "user"}])[0])
                statuses.append(client.complete("lora", " ".join(["w7"] * 80))[0])
                statuses.append(load(client, "x", folders["ia3"])[0])
            return statuses

        calls: list[Any] = [
            lambda a=a, p=p: good(a, p) for a in ("lora", "ia3", "bn", "prefix", BASE) for p in PROMPTS[:3]
        ]
        results = concurrently([*calls, bad, bad])
        for adapter, prompt, text in results[:-2]:
            assert text == offline(reference, adapter, prompt, 6), (adapter, prompt)
        for statuses in results[-2:]:
            assert statuses == [404, 400, 400, 403] * 3
        assert busy, "the queue never filled; the 503 path was not exercised"
        assert client.request("GET", "/health")[2]["status"] == "ok"
        assert engine.stats.to_dict()["rejected_queue_full"] == len(busy)


# ---- SIGTERM ---------------------------------------------------------------------------------
def long_running_model(folder: Path) -> None:
    """A tiny llama with a long context and no end-of-sequence token: it always runs to max_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tok = tokenizer()
    tok.eos_token = None
    tok.save_pretrained(folder)


def test_sigterm_finishes_running_requests_then_exits_0(tmp_path: Path) -> None:
    long_running_model(tmp_path / "model")
    with serve_process(tmp_path / "model", "--shutdown-grace", "60") as (proc, client, port):
        tokens = 1000
        sock = raw_request(client, {"model": "model", "prompt": "w5 w6", "max_tokens": tokens, "stream": True,
                                    "temperature": 0, "stream_options": {"include_usage": True}})  # fmt: skip
        received = b""
        while received.count(b"data: ") < 2:
            received += sock.recv(65536)
        proc.send_signal(signal.SIGTERM)
        # the listening socket closes: new clients are refused while the old one is still served
        refused = False
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                refused = True
                break
            time.sleep(0.05)
        assert refused, "still accepting connections after SIGTERM"
        sock.settimeout(60)
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked response
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        assert b"data: [DONE]" in received, received[-300:]
        sock.close()
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read() if proc.stdout else ""
    assert "SIGTERM: taking no new requests" in output and "peftlab serve: stopped" in output, output
    events = [e for e in received.decode(errors="replace").split("\r\n") if e.startswith("data: {")]
    usage = json.loads(events[-1][len("data: ") :])["usage"]
    assert usage["completion_tokens"] == tokens  # the request ran to its end after SIGTERM
