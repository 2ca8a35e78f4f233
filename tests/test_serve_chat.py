"""``POST /v1/chat/completions``: messages rendered by the tokenizer's own chat template, any
adapter (or the base) by ``model``, streaming; malformed messages named field by field; and the
official ``openai`` client against completions and chat, streamed and not (a dev dependency,
so this always runs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from peftlab import PeftModel
from peftlab.serving import ServeError
from peftlab.serving.chat import parse_messages, render_chat
from serve_helpers import BASE, METHODS, PROMPTS, Client, alone, engine_for, offline, serving, tokenizer

CHAT = [
    {"role": "system", "content": "w20 w21"},
    {"role": "user", "content": "w5 w9 w13"},
    {"role": "assistant", "content": "w40 w41"},
    {"role": "user", "content": [{"type": "text", "text": "w70 "}, {"type": "text", "text": "w3"}]},
]


# ``folders`` (the four adapters saved) and ``reference`` (them loaded) are conftest's fixtures
@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[Client]:
    with serving(engine_for(folders, METHODS, max_batch_size=8)) as client:
        yield client


def chat_ids(messages: list[dict[str, Any]]) -> list[int]:
    """The prompt the model's template makes, tokenized as the server does."""
    text = tokenizer().apply_chat_template(
        parse_messages(messages), tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer()(text, add_special_tokens=False)["input_ids"])


def want(reference: PeftModel, adapter: str, messages: list[dict[str, Any]], max_tokens: int) -> str:
    new, _ = alone(reference, adapter, chat_ids(messages), max_tokens)
    return str(tokenizer().decode(new, skip_special_tokens=True))


def test_the_chat_template_makes_the_prompt() -> None:
    ids = chat_ids(CHAT)
    # system, user, assistant, user turns, each closed by w93, then the assistant's turn opens
    assert tokenizer().decode(ids) == ("w90 w20 w21 w93 w91 w5 w9 w13 w93 w92 w40 w41 w93 w91 w70 w3 w93 w92")


def test_chat_for_every_adapter_equals_generate_alone(server: Client, reference: PeftModel) -> None:
    texts = {}
    for adapter in (BASE, "lora", "ia3", "bn", "prefix"):
        status, body = server.chat(adapter, CHAT, max_tokens=6)
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["model"] == adapter
        assert body["id"].startswith("chatcmpl-")
        (choice,) = body["choices"]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == want(reference, adapter, CHAT, 6), adapter
        assert choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["prompt_tokens"] == len(chat_ids(CHAT))
        texts[adapter] = choice["message"]["content"]
    assert len(set(texts.values())) >= 4  # the adapters really answer differently


def test_chat_streams_role_then_text(server: Client, reference: PeftModel) -> None:
    body = {"model": "prefix", "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    status, head, text = server.request("POST", "/v1/chat/completions", body)
    assert status == 200 and head["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d["content"] for d in deltas) == want(reference, "prefix", CHAT, 6)
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == len(chat_ids(CHAT))


def test_chat_without_max_tokens_stops_at_the_context(server: Client) -> None:
    long = [{"role": "user", "content": " ".join(["w7"] * 55)}]  # 58 tokens of a 64-token context
    status, body = server.chat("lora", long)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= 64 - len(chat_ids(long))


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        (None, "messages", "is missing"),
        ("w5", "messages", "must be a list"),
        ([], "messages", "is empty"),
        (["w5"], "messages[0]", "must be an object"),
        ([{"content": "w5"}], "messages[0].role", "is missing"),
        ([{"role": "robot", "content": "w5"}], "messages[0].role", "must be one of"),
        ([{"role": "tool", "content": "w5"}], "messages[0].role", "tool calls are not supported"),
        ([{"role": "user", "content": "w5"}, {"role": "user"}], "messages[1].content", "is missing"),
        ([{"role": "user", "content": 5}], "messages[0].content", "string or a list of text parts"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
            "only text parts",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            "messages[0].content[0].text",
            "string",
        ),
    ],
)
def test_malformed_messages_get_400_naming_the_field(
    server: Client, messages: Any, param: str, words: str
) -> None:
    status, _, body = server.request("POST", "/v1/chat/completions", {"model": "lora", "messages": messages})
    assert status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["message"].startswith(param + ":") and words in body["error"]["message"]


def test_chat_errors(server: Client) -> None:
    status, body = server.chat("nope", CHAT)
    assert status == 404 and "'nope'" in body["error"]["message"] and "lora" in body["error"]["message"]
    status, body = server.chat("lora", [{"role": "user", "content": " ".join(["w7"] * 70)}])
    assert status == 400 and "tokens" in body["error"]["message"], body
    status, body = server.chat("lora", CHAT, max_tokens=60)
    assert status == 400 and "context length of 64" in body["error"]["message"]
    status, body = server.chat("lora", CHAT, tools=[{"type": "function", "function": {"name": "f"}}])
    assert status == 400 and body["error"]["param"] == "tools"
    status, body = server.chat("lora", CHAT, n=3)
    assert status == 400 and body["error"]["param"] == "n"


def test_a_model_without_chat_template_says_so() -> None:
    with pytest.raises(ServeError, match="no chat template") as err:
        render_chat(tokenizer(chat_template=None), parse_messages(CHAT))
    assert err.value.status == 400
    refusing = tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ServeError, match="roles must alternate"):
        render_chat(refusing, parse_messages(CHAT))


def test_official_openai_client(server: Client, reference: PeftModel) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert next(m.id for m in api.models.list()) == BASE
    out = api.completions.create(model="ia3", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert out.choices[0].text == offline(reference, "ia3", PROMPTS[0], 5)
    pieces = api.completions.create(model="bn", prompt=PROMPTS[1], max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == offline(reference, "bn", PROMPTS[1], 5)

    messages: Any = CHAT
    reply = api.chat.completions.create(model="lora", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want(reference, "lora", CHAT, 6)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(chat_ids(CHAT))
    stream = api.chat.completions.create(
        model=BASE, messages=messages, max_tokens=6, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == want(reference, BASE, CHAT, 6)

    with pytest.raises(openai.NotFoundError, match="nope"):
        api.chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        api.chat.completions.create(model="lora", messages=[{"role": "robot", "content": "w5"}])  # type: ignore[list-item, misc]
