"""The model worker behind ``peftlab serve``: requests for any adapters gathered into one batch.

One thread owns the model. Each prompt becomes a :class:`Row` that waits in a bounded asyncio
queue; a dispatcher on the event loop gathers up to ``max_batch_size`` rows (waiting at most
``max_wait_ms`` after the first) and runs them as one ``generate(..., adapter_names=[...])``
call with left padding, so every row goes through its own adapter. Adapter loads and unloads
travel through the same queue and run between batches in arrival order: a request queued
before an unload is served first, one queued after it gets a clear 404.

Rows stop on their own: a stopping criterion ends each row at its eos, its ``max_tokens`` or
its stop strings, and a logits processor samples rows with ``temperature > 0`` from their own
seeded generator, so a row's output does not depend on what else is in its batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core.peft_model import BASE_ADAPTER, PeftModel

log = logging.getLogger("peftlab.serve")

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


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


@dataclass
class Row:
    """One prompt of a request, decoded by the model worker."""

    adapter: str  # an adapter name, or "__base__"
    prompt_ids: list[int]
    params: SamplingParams
    job: Job
    index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    streamed: int = 0  # characters of text already sent as stream chunks
    generator: torch.Generator | None = None


class Job:
    """One request: its rows, a future for the whole result and, when streaming, an event queue.

    Touched only on the event loop's thread; the model worker reaches it through
    ``loop.call_soon_threadsafe``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.loop = loop
        self.rows: list[Row] = []
        self.future: asyncio.Future[None] = loop.create_future()
        self.events: asyncio.Queue[StreamChunk | ServeError] | None = asyncio.Queue() if stream else None
        self.cancelled = False  # read by the worker: the client has gone, stop decoding
        self.pending = 0

    @property
    def finished(self) -> bool:
        return self.future.done()

    def push(self, chunk: StreamChunk) -> None:
        if self.events is not None and not self.finished:
            self.events.put_nowait(chunk)

    def row_done(self) -> None:
        self.pending -= 1
        if self.pending == 0 and not self.finished:
            self.future.set_result(None)

    def fail(self, err: ServeError) -> None:
        if self.finished:
            return
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


@dataclass
class _AdminOp:
    kind: str  # "load" | "unload"
    name: str
    path: str | None
    future: asyncio.Future[dict[str, Any]]


@dataclass
class EngineStats:
    """What the worker has done: batches run, rows per batch, mixed-adapter batches, tokens."""

    batches: int = 0
    rows: int = 0
    mixed_batches: int = 0  # batches holding rows for more than one adapter (or the base)
    max_batch_rows: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    rejected_full: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "mixed_batches": self.mixed_batches,
            "max_batch_rows": self.max_batch_rows,
            "mean_batch_rows": round(self.rows / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "generated_tokens": self.generated_tokens,
            "busy_seconds": round(self.busy_seconds, 3),
            "rejected_queue_full": self.rejected_full,
        }


def check_adapter_name(name: str, base_name: str) -> None:
    """Names appear in URLs and in ``model`` fields: letters, digits, ``_`` and ``-`` only."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise ServeError(
            400,
            f"adapter name {name!r} is not usable: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit",
            param="name",
        )
    if name == base_name:
        raise ServeError(400, f"adapter name {name!r} is the base model's name; pick another", param="name")
    if hasattr(nn.ModuleDict, name):
        raise ServeError(
            400, f"adapter name {name!r} is the name of a torch.nn.Module method; pick another", param="name"
        )


def check_adapter_folder(path: str) -> Path:
    """A local folder saved by ``save_pretrained``: ``adapter_config.json`` + safetensors weights."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ServeError(400, f"adapter path {path!r} does not exist on the server", param="path")
    if not folder.is_dir():
        raise ServeError(
            400, f"adapter path {path!r} is a file; give the folder that holds {CONFIG_FILE}", param="path"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise ServeError(
            400,
            f"{path!r} is not a PEFT adapter folder: it has no {CONFIG_FILE} (save adapters with "
            "model.save_pretrained(folder))",
            param="path",
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise ServeError(
            400,
            f"{path!r} has no {WEIGHTS_FILE}; the server loads adapter weights only from safetensors "
            "(re-save a pickled adapter_model.bin with save_pretrained)",
            param="path",
        )
    return folder.resolve()


class Engine:
    """One base model, many adapters, requests batched across adapters by one model worker.

    Create it, ``await start()`` inside the serving event loop, ``submit`` jobs, ``await stop()``.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: Any,
        *,
        base_name: str,
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        max_prompt_tokens: int | None = None,
        max_tokens_limit: int | None = None,
        adapter_paths: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(model, PeftModel):
            raise TypeError("Engine needs a peftlab PeftModel (PeftModel(base) makes one with no adapter)")
        for value, flag in ((max_batch_size, "max_batch_size"), (max_queue, "max_queue")):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        # positions the model was trained for; prompt + completion must fit in them
        context = getattr(getattr(model.base_model, "config", None), "max_position_embeddings", None)
        self.context_length: int | None = int(context) if context else None
        self.max_prompt_tokens = max_prompt_tokens or (
            self.context_length - 1 if self.context_length else 4096
        )
        self.max_tokens_limit = max_tokens_limit or (self.context_length or 4096)
        for value, flag in (
            (self.max_prompt_tokens, "max_prompt_tokens"),
            (self.max_tokens_limit, "max_tokens_limit"),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        self.adapters: dict[str, dict[str, Any]] = {}  # name -> {"method", "path"}; loop thread only
        for name in model.peft_config:
            self._register(name, (adapter_paths or {}).get(name))
        self.stats = EngineStats()
        self.running_rows = 0  # rows handed to the model worker right now
        self.created = int(time.time())
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.eos_ids = _eos_ids(model, tokenizer)
        self._pad = _pad_id(tokenizer, self.eos_ids)
        self._tok_lock = threading.Lock()  # fast tokenizers must not be used by two threads at once
        self._queue: asyncio.Queue[Row | _AdminOp] | None = None
        self._arrived: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="peftlab-model")
        self._dispatcher = asyncio.create_task(self._dispatch(), name="peftlab-dispatch")

    async def stop(self) -> None:
        """Stop taking work; what is still queued is answered 503."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                err = ServeError(503, "the server is shutting down", kind="server_error")
                if isinstance(item, Row):
                    item.job.fail(err)
                elif not item.future.done():
                    item.future.set_exception(err)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- what clients see -----------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def resolve(self, model: str) -> str:
        """The adapter a request's ``model`` field names (``"__base__"`` for the base model)."""
        if model in (self.base_name, BASE_ADAPTER):
            return BASE_ADAPTER
        if model in self.adapters:
            return model
        raise ServeError(
            404,
            f"model {model!r} is not loaded; available models: {', '.join(self.model_names())}",
            kind="not_found_error",
            param="model",
        )

    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def encode(self, prompt: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def check_lengths(self, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> None:
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise ServeError(
                400,
                f"max_tokens must be between 1 and {self.max_tokens_limit}, got {max_tokens}",
                param="max_tokens",
            )
        for i, ids in enumerate(prompt_ids):
            which = f"prompt {i}" if len(prompt_ids) > 1 else "the prompt"
            if not ids:
                raise ServeError(400, f"{which} is empty (no tokens); give some text", param="prompt")
            if len(ids) > self.max_prompt_tokens:
                raise ServeError(
                    400,
                    f"{which} has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}",
                    param="prompt",
                )
            if self.context_length and len(ids) + max_tokens > self.context_length:
                raise ServeError(
                    400,
                    f"{which} ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                    f"context length of {self.context_length} tokens; shorten the prompt or lower max_tokens",
                    param="max_tokens",
                )

    def submit(
        self, adapter: str, prompt_ids: Sequence[list[int]], params: SamplingParams, *, stream: bool = False
    ) -> Job:
        """Queue one request (one row per prompt); 503 when the queue cannot take all its rows."""
        queue, loop = self._require_started()
        free = queue.maxsize - queue.qsize()
        if len(prompt_ids) > free:
            self.stats.rejected_full += 1
            raise ServeError(
                503,
                f"the server is busy ({queue.qsize()} prompts queued, at most {queue.maxsize}); "
                "retry shortly",
                kind="server_error",
                headers={"Retry-After": str(self._retry_after())},
            )
        job = Job(loop, stream)
        for i, ids in enumerate(prompt_ids):
            row = Row(adapter, list(ids), params, job, i)
            job.rows.append(row)
            queue.put_nowait(row)
        job.pending = len(job.rows)
        assert self._arrived is not None
        self._arrived.set()
        return job

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load a PEFT-format adapter folder between batches; 400 for a bad name or folder."""
        check_adapter_name(name, self.base_name)
        folder = check_adapter_folder(path)
        if name in self.adapters:
            raise ServeError(
                409, f"adapter {name!r} is loaded already; DELETE /v1/adapters/{name} first", param="name"
            )
        return await self._admin("load", name, str(folder))

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        """Unload after every request queued before this call has run."""
        if name not in self.adapters:
            raise ServeError(
                404,
                f"no adapter named {name!r} is loaded; loaded adapters: {', '.join(self.adapters) or 'none'}",
                kind="not_found_error",
            )
        return await self._admin("unload", name, None)

    # ---- internals ---------------------------------------------------------------------------
    def _require_started(self) -> tuple[asyncio.Queue[Row | _AdminOp], asyncio.AbstractEventLoop]:
        if self._queue is None or self._loop is None or self._dispatcher is None:
            raise ServeError(503, "the model worker is not running", kind="server_error")
        return self._queue, self._loop

    def _retry_after(self) -> int:
        per_batch = self.stats.busy_seconds / self.stats.batches if self.stats.batches else 1.0
        waiting = self.queue_depth() / self.max_batch_size
        return max(1, math.ceil(waiting * per_batch))

    def _register(self, name: str, path: str | None) -> None:
        config = self.model.peft_config[name]
        self.adapters[name] = {"method": str(config.peft_type), "path": path}

    async def _admin(self, kind: str, name: str, path: str | None) -> dict[str, Any]:
        queue, loop = self._require_started()
        op = _AdminOp(kind, name, path, loop.create_future())
        try:
            queue.put_nowait(op)
        except asyncio.QueueFull:
            self.stats.rejected_full += 1
            raise ServeError(
                503,
                "the server is busy (queue full); retry the adapter operation shortly",
                kind="server_error",
                headers={"Retry-After": str(self._retry_after())},
            ) from None
        assert self._arrived is not None
        self._arrived.set()
        return await op.future

    async def _dispatch(self) -> None:
        queue, loop = self._require_started()
        assert self._arrived is not None
        carried: Row | _AdminOp | None = None
        while True:
            item = carried if carried is not None else await queue.get()
            carried = None
            if isinstance(item, _AdminOp):
                await self._run_admin(item)
                continue
            batch = [item]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    # waiting on an event, never on queue.get(), so a timeout cannot lose an item
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
                    continue
                if isinstance(nxt, _AdminOp):
                    carried = nxt  # adapter ops run between batches, in arrival order
                    break
                batch.append(nxt)
            await self._run_batch(batch)

    async def _run_admin(self, op: _AdminOp) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        try:
            if op.kind == "load":
                if op.name in self.adapters:  # loaded by an op queued before this one
                    raise ServeError(409, f"adapter {op.name!r} is loaded already", param="name")
                await loop.run_in_executor(self._executor, self._load, op.name, op.path)
                self._register(op.name, op.path)
                result = {"id": op.name, "object": "adapter", **self.adapters[op.name]}
            else:
                if op.name not in self.adapters:
                    raise ServeError(404, f"no adapter named {op.name!r} is loaded", kind="not_found_error")
                await loop.run_in_executor(self._executor, self.model.delete_adapter, op.name)
                info = self.adapters.pop(op.name)
                result = {"id": op.name, "object": "adapter", "deleted": True, **info}
        except ServeError as err:
            if not op.future.done():
                op.future.set_exception(err)
            return
        except (ValueError, TypeError, FileNotFoundError, OSError) as err:
            if not op.future.done():
                op.future.set_exception(
                    ServeError(400, f"cannot load adapter {op.name!r}: {err}", param="path")
                )
            return
        except Exception as err:  # the worker must survive anything an adapter op raises
            log.exception("adapter %s of %r failed", op.kind, op.name)
            if not op.future.done():
                op.future.set_exception(
                    ServeError(500, f"adapter {op.kind} failed: {err}", kind="server_error")
                )
            return
        if not op.future.done():
            op.future.set_result(result)

    def _load(self, name: str, path: str | None) -> None:
        assert path is not None
        self.model.load_adapter(path, adapter_name=name)
        self.model.to(self._device)

    async def _run_batch(self, batch: list[Row]) -> None:
        assert self._executor is not None
        live: list[Row] = []
        for row in batch:
            if row.job.finished or row.job.cancelled:
                continue
            if row.adapter != BASE_ADAPTER and row.adapter not in self.adapters:
                row.job.fail(
                    ServeError(
                        404,
                        f"adapter {row.adapter!r} was unloaded before this request ran; available "
                        f"models: {', '.join(self.model_names())}",
                        kind="not_found_error",
                        param="model",
                    )
                )
                continue
            live.append(row)
        if not live:
            return
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        self.running_rows = len(live)
        try:
            await loop.run_in_executor(self._executor, self._generate, live, loop)
        except Exception as err:
            log.exception("generation failed for a batch of %d", len(live))
            for row in live:
                row.job.fail(ServeError(500, f"generation failed: {err}", kind="server_error"))
            return
        finally:
            self.running_rows = 0
            self.stats.busy_seconds += time.perf_counter() - start
        self.stats.batches += 1
        self.stats.rows += len(live)
        self.stats.batch_sizes[len(live)] += 1
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(live))
        self.stats.mixed_batches += len({r.adapter for r in live}) > 1
        for row in live:
            self.stats.generated_tokens += len(row.tokens)
            row.job.row_done()

    # ---- the model worker's side (runs on its thread) ------------------------------------------
    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _generate(self, rows: list[Row], loop: asyncio.AbstractEventLoop) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            ids[i, width - n :] = torch.tensor(row.prompt_ids)  # left padding: every row ends at the edge
            mask[i, width - n :] = 1
        tracker = _RowTracker(self, rows, loop)
        processors = LogitsProcessorList()
        if any(r.params.temperature > 0 for r in rows):
            processors.append(_RowSampler(rows))
        with torch.no_grad():
            self.model.generate(
                input_ids=ids.to(self._device),
                attention_mask=mask.to(self._device),
                adapter_names=[r.adapter for r in rows],
                max_new_tokens=max(r.params.max_tokens for r in rows),
                # every row is decoded greedily from the processed scores: _RowSampler turns a
                # sampled row's scores into its drawn token, so nothing is inherited from the
                # model's generation_config
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=sorted(self.eos_ids) or None,
                pad_token_id=self._pad,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        for row in rows:
            if row.finish_reason is None:  # generate stopped at max_new_tokens before our check
                tracker.finish(row, "length")


class _RowTracker:
    """Stopping criterion: records each row's new token and ends the row at eos, its own
    ``max_tokens`` or a stop string; streams text as it becomes final."""

    def __init__(self, engine: Engine, rows: list[Row], loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.rows = rows
        self.loop = loop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, -1].tolist()
        done = []
        for row, token in zip(self.rows, new, strict=True):
            if row.finish_reason is None:
                if row.job.cancelled:
                    row.finish_reason = "cancelled"
                else:
                    self.advance(row, int(token))
            done.append(row.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def advance(self, row: Row, token: int) -> None:
        if token in self.engine.eos_ids:
            self.finish(row, "stop")
            return
        row.tokens.append(token)
        stop = row.params.stop
        streaming = row.job.events is not None
        if stop or streaming:
            text = self.engine.decode(row.tokens)
            cut = min((p for p in (text.find(s) for s in stop) if p >= 0), default=-1)
            if cut >= 0:
                row.text = text[:cut]
                self._emit(row, row.text, "stop")
                row.finish_reason = "stop"
                return
            if len(row.tokens) >= row.params.max_tokens:
                self.finish(row, "length", text)
                return
            if streaming:
                # hold back what could still become a stop string, and half-decoded characters
                hold = max((len(s) for s in stop), default=1) - 1
                upto = len(text) - hold
                while upto > row.streamed and text[upto - 1] == "\ufffd":
                    upto -= 1
                self._emit(row, text[:upto], None)
            return
        if len(row.tokens) >= row.params.max_tokens:
            self.finish(row, "length")

    def finish(self, row: Row, reason: str, text: str | None = None) -> None:
        row.text = self.engine.decode(row.tokens) if text is None else text
        row.finish_reason = reason
        self._emit(row, row.text, reason)

    def _emit(self, row: Row, text: str, reason: str | None) -> None:
        if row.job.events is None:
            return
        delta = text[row.streamed :]
        if not delta and reason is None:
            return
        row.streamed = max(row.streamed, len(text))
        self.loop.call_soon_threadsafe(row.job.push, StreamChunk(row.index, delta, reason))


class _RowSampler:
    """Logits processor: a sampled row draws its token from softmax(logits / T) (top-p filtered)
    with its own generator, then its scores become that one token, so greedy selection picks
    it. Greedy rows pass through untouched."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for i, row in enumerate(self.rows):
            p = row.params
            if p.temperature <= 0 or row.finish_reason is not None:
                continue
            if row.generator is None:
                row.generator = torch.Generator(device=scores.device)
                row.generator.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            probs = torch.softmax(scores[i].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest set of tokens whose mass reaches top_p (the first always)
                keep = (sorted_probs.cumsum(0) - sorted_probs) < p.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            token = int(torch.multinomial(probs, 1, generator=row.generator))
            if out is scores:
                out = scores.clone()
            out[i] = -math.inf
            out[i, token] = 0.0
        return out


def _eos_ids(model: PeftModel, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    config = getattr(model.base_model, "generation_config", None)
    gen_eos = getattr(config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(e) for e in gen_eos)
    return ids


def _pad_id(tokenizer: Any, eos: set[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    if eos:
        return min(eos)  # padding is masked out, any id will do
    return 0
