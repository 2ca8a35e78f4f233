"""``peftlab serve`` against a hostile client (issue 31's list): each bad request is a clear 4xx
naming the problem, and the good requests decoding beside it, in the same batch, get exactly
what they get alone; and requests still running when ``--shutdown-grace`` runs out get a JSON
503 "shutting down", not a plain-text 500 with a traceback."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from peftlab import PeftModel
from serve_helpers import (
    BASE,
    PROMPTS,
    concurrently,
    engine_for,
    offline,
    serve_process,
    serving,
    slowed,
)
from test_serve_ops import long_running_model, raw_request

# ``folders`` (the four adapters saved) and ``reference`` (them loaded) are conftest's fixtures

BAD: list[tuple[str, str, Any, int, str]] = [
    # (what, path, body, status, a part of the message)
    ("seed >= 2**64", "/v1/completions",
     {"model": "lora", "prompt": "w5", "max_tokens": 4, "seed": 2**64, "temperature": 0.7},
     400, "seed must be an integer from -2**63 to 2**64 - 1"),
    ("seed below -2**63", "/v1/chat/completions",
     {"model": "lora", "messages": [{"role": "user", "content": "w5"}], "seed": -(2**63) - 1},
     400, "seed must be an integer"),
    ("lone surrogate in a prompt", "/v1/completions",
     {"model": "lora", "prompt": "w5 \ud800 w6", "max_tokens": 4}, 400, "lone surrogate"),
    ("lone surrogate in a list of prompts", "/v1/completions",
     {"model": "ia3", "prompt": ["w5", "w6\udfff"], "max_tokens": 4},
     400, "prompt[1] holds a lone surrogate"),
    ("lone surrogate in a chat message", "/v1/chat/completions",
     {"model": "bn", "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),
    ('max_tokens "5"', "/v1/completions", {"model": "lora", "prompt": "w5", "max_tokens": "5"},
     422, "field 'max_tokens': Input should be a valid integer"),
    ("max_tokens true", "/v1/completions", {"model": "lora", "prompt": "w5", "max_tokens": True},
     422, "field 'max_tokens': Input should be a valid integer"),
    ("max_completion_tokens true", "/v1/chat/completions",
     {"model": "lora", "messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": True},
     422, "max_completion_tokens"),
    ('temperature "0"', "/v1/completions", {"model": "lora", "prompt": "w5", "temperature": "0"},
     422, "field 'temperature'"),
    ("more prompts than the queue holds", "/v1/completions",
     {"model": "lora", "prompt": ["w5"] * 5, "max_tokens": 2}, 400, "this server queues at most 4"),
    ("an adapter path of 5,000 characters", "/v1/adapters", {"name": "long", "path": "a" * 5000},
     400, "is too long"),
    ("an adapter path with a 300-character folder name", "/v1/adapters",
     {"name": "long", "path": "x/" + "b" * 300}, 400, "255 per folder name"),
]  # fmt: skip


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_each_bad_request_is_a_4xx_and_the_batch_beside_it_is_served(
    folders: dict[str, Path],
    reference: PeftModel,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    batching: str,
) -> None:
    engine = engine_for(
        folders, ("lora", "ia3", "bn", "prefix"), max_batch_size=8, max_queue=4, max_prompts=8,
        batching=batching, adapter_dirs=[str(tmp_path)],
    )  # fmt: skip
    slowed(monkeypatch, engine, 0.01)  # the good requests are still decoding when the bad arrive
    with serving(engine) as client:

        def good(adapter: str, prompt: str) -> tuple[str, str, str]:
            for _ in range(400):
                status, _, body = client.request(
                    "POST", "/v1/completions", {"model": adapter, "prompt": prompt, "max_tokens": 6,
                                                "temperature": 0, "seed": 2**64 - 1}
                )  # fmt: skip
                if status != 503:  # a full queue: try again
                    assert status == 200, body
                    return adapter, prompt, body["choices"][0]["text"]
                time.sleep(0.05)
            raise AssertionError("never served")

        def bad(case: tuple[str, str, Any, int, str]) -> tuple[str, int, Any]:
            what, path, body, _, _ = case
            for _ in range(400):
                status, head, answer = client.request("POST", path, body)
                if status != 503:
                    assert head.get("content-type", "").startswith("application/json"), (what, answer)
                    return what, status, answer
                time.sleep(0.05)
            raise AssertionError(f"{what}: never answered")

        calls: list[Any] = [
            lambda a=a, p=p: good(a, p) for a in ("lora", "prefix", BASE) for p in PROMPTS[:2]
        ]
        calls += [lambda c=c: bad(c) for c in BAD]
        results = concurrently(calls)
        for adapter, prompt, text in results[: len(calls) - len(BAD)]:
            assert text == offline(reference, adapter, prompt, 6), (adapter, prompt)
        for (what, status, answer), (_, _, _, expected, message) in zip(
            results[-len(BAD) :], BAD, strict=True
        ):
            assert status == expected, (what, status, answer)
            assert message in answer["error"]["message"] if "error" in answer else json.dumps(answer), (
                what,
                answer,
            )
        assert client.request("GET", "/health")[2]["status"] == "ok"


def test_requests_running_when_the_grace_runs_out_get_a_json_503(tmp_path: Path) -> None:
    """SIGTERM with --shutdown-grace 2 while a long request and a long stream run: the request is
    answered 503 in JSON ("shutting down"), the stream ends with an error event, the log has no
    traceback, and the process exits 0."""
    long_running_model(tmp_path / "model")
    with serve_process(tmp_path / "model", "--shutdown-grace", "2") as (proc, client, _):
        body = {"model": "model", "prompt": "w5 w6", "max_tokens": 1900, "temperature": 0}
        plain = raw_request(client, body)
        stream = raw_request(client, {**body, "stream": True})
        received = b""
        while received.count(b"data: ") < 2:
            received += stream.recv(65536)
        time.sleep(0.5)  # the plain request is decoding too
        proc.send_signal(signal.SIGTERM)
        answers = []
        for sock, data in ((plain, b""), (stream, received)):
            sock.settimeout(60)
            while piece := sock.recv(65536):  # the server closes each connection at shutdown
                data += piece
            answers.append(data.decode(errors="replace"))
            sock.close()
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read() if proc.stdout else ""
    head, _, rest = answers[0].partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and "application/json" in head, answers[0][:500]
    assert "the server is shutting down" in rest, rest[:500]
    assert "the server is shutting down" in answers[1], answers[1][-500:]
    assert "Traceback" not in output and "Cancel" not in output, output
