"""What a request becomes inside ``peftlab serve``: a :class:`Job` holding one :class:`Row` per
prompt, each row decoded with its own adapter and :class:`SamplingParams`.

A job lives on the event loop's thread; the model worker only writes its rows' decoding state
and reaches the job through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from peftlab.core.composition import Stack


class ServeError(Exception):
    """An error with its HTTP status and an OpenAI-style type, e.g. 404 ``not_found_error``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.headers = headers or {}


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded: ``temperature == 0`` is greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class StreamChunk:
    """New text of one row; ``finish_reason`` is set on the row's last chunk."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass(eq=False)
class Row:
    """One prompt of a request and its decoding state (written by the model worker only)."""

    adapter: str | Stack  # an adapter name, "__base__", or a Stack of names ("a+b" in a request)
    prompt_ids: list[int]
    params: SamplingParams
    job: Job
    index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    streamed: int = 0  # characters of text already sent as stream chunks
    generator: torch.Generator | None = None
    first_token_at: float | None = None  # time.perf_counter() of its first token


def route_names(route: str | Stack) -> tuple[str, ...]:
    """The adapter names a row's route uses (``"__base__"`` as it is)."""
    return route.names if isinstance(route, Stack) else (route,)


class Job:
    """One request: its rows, a future for the whole result and, when streaming, an event queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool, model: str) -> None:
        self.loop = loop
        self.model = model  # the name the client asked for (an adapter or the base model)
        self.rows: list[Row] = []
        self.future: asyncio.Future[None] = loop.create_future()
        self.events: asyncio.Queue[StreamChunk | ServeError] | None = asyncio.Queue() if stream else None
        self.cancelled = False  # read by the worker: the client has gone, stop decoding
        self.pending = 0
        self.created = time.perf_counter()
        self.ended: float | None = None

    @property
    def finished(self) -> bool:
        return self.future.done()

    @property
    def first_token_at(self) -> float | None:
        times = [r.first_token_at for r in self.rows if r.first_token_at is not None]
        return min(times) if times else None

    def push(self, chunk: StreamChunk) -> None:
        if self.events is not None and not self.finished:
            self.events.put_nowait(chunk)

    def row_done(self) -> bool:
        """Count one row as done; True when that was the last one."""
        self.pending -= 1
        if self.pending == 0 and not self.finished:
            self.ended = time.perf_counter()
            self.future.set_result(None)
            return True
        return False

    def fail(self, err: ServeError) -> None:
        if self.finished:
            return
        self.ended = time.perf_counter()
        if self.events is not None:
            # a streaming handler reads the queue, not the future
            self.events.put_nowait(err)
            self.future.set_result(None)
        else:
            self.future.set_exception(err)

    def cancel(self) -> None:
        self.cancelled = True
        if not self.finished:
            self.future.cancel()
