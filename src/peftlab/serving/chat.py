"""Chat requests: OpenAI ``messages`` checked field by field, then rendered into one prompt by
the tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

from __future__ import annotations

from typing import Any

from peftlab.serving.jobs import ServeError

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer "system"


def _bad(field: str, message: str) -> ServeError:
    return ServeError(400, f"{field}: {message}", param=field)


def _text(field: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"{field}[{j}]"
            if not isinstance(part, dict):
                raise _bad(where, 'a content part must be an object like {"type": "text", "text": "..."}')
            if part.get("type") != "text":
                raise _bad(
                    f"{where}.type",
                    f"only text parts are supported, got {part.get('type')!r} (this server reads text only)",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.text", "must be a string")
            parts.append(text)
        return "".join(parts)
    raise _bad(field, f"must be a string or a list of text parts, got {type(content).__name__}")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with text content; 400 naming the bad field."""
    if not isinstance(messages, list):
        raise _bad("messages", f"must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise _bad("messages", "is empty; send at least one message")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if "role" not in message:
            raise _bad(f"{where}.role", "is missing")
        if role not in ROLES:
            hint = " (tool calls are not supported)" if role in ("tool", "function") else ""
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}{hint}")
        if "content" not in message or message["content"] is None:
            raise _bad(f"{where}.content", "is missing (tool calls are not supported)")
        if message.get("tool_calls"):
            raise _bad(f"{where}.tool_calls", "tool calls are not supported")
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _text(f"{where}.content", message["content"]),
            }
        )
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text the model's chat template makes of ``messages``, ready for the assistant."""
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(
            400,
            "this model's tokenizer has no chat template, so it cannot take chat messages; send a plain "
            "prompt to /v1/completions instead",
            param="messages",
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template itself refuses (jinja's raise_exception): say what it said
        raise ServeError(
            400, f"the model's chat template refused these messages: {err}", param="messages"
        ) from None
    if not isinstance(text, str):
        raise ServeError(500, "the chat template did not render to text", kind="server_error")
    return text
