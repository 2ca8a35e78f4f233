"""The model worker behind ``peftlab serve``: requests for any adapters decoded in one batch.

One thread owns the model. Each prompt becomes a :class:`~peftlab.serving.jobs.Row` that waits
in a bounded queue; a dispatcher on the event loop hands rows to the worker:

* ``batching="continuous"`` (the default): at every decoding step, waiting rows join the
  running batch as long as it has room (``max_batch_size``) and their prompts fit this step's
  prefill budget (``max_prefill_tokens``; a longer prompt is prefilled alone in chunks of that
  many tokens, one per step, while the running rows go on decoding), finished rows leave at
  once, and rows whose client has gone are dropped (:mod:`peftlab.serving.continuous`;
  encoder-decoders: :mod:`peftlab.serving.encoder_decoder`, whose encoder reads a prompt whole);
* ``batching="static"``: up to ``max_batch_size`` rows (waiting at most ``max_wait_ms`` after
  the first) run as one ``generate`` call to the end (:mod:`peftlab.serving.static`).

Either way every row goes through its own adapter (``adapter_names``), and its sampling and stop
rules are its own (:mod:`peftlab.serving.decoding`). A row's adapter may be a composition
(``"model": "domain+sql"`` is ``Stack("domain", "sql")``): ``adapter_names`` takes a ``Stack`` per
row, so composed rows share batches with single-adapter and base rows. Adapter loads and unloads
travel through the same queue in arrival order: a request queued before an unload is served first
(the unload waits for the rows using that adapter to finish), one queued after it gets a clear 404.
With ``max_loaded_adapters`` a request naming an adapter folder in a root that is not loaded
queues its load ahead of its rows (one load however many requests wait on it); to stay within the
limit the least recently used adapter loaded that way that no running or queued row needs is
unloaded first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.core.composition import Stack
from peftlab.core.peft_model import BASE_ADAPTER, PeftModel
from peftlab.serving.adapters import (
    AdapterRoots,
    check_adapter_folder,
    check_adapter_limit,
    check_adapter_name,
    on_disk,
)
from peftlab.serving.continuous import RunningBatch, StepReport
from peftlab.serving.decoding import StopRules, eos_ids
from peftlab.serving.encoder_decoder import EncoderDecoderBatch, is_encoder_decoder
from peftlab.serving.jobs import Job, Row, SamplingParams, ServeError, StreamChunk, route_names
from peftlab.serving.metrics import ServeMetrics
from peftlab.serving.small_batch import wanted as small_batch_wanted
from peftlab.serving.static import generate_batch
from peftlab.training.encoding import pad_id

log = logging.getLogger("peftlab.serve")

BATCHING = ("continuous", "static")
COMPOSE = "+"  # "domain+sql" in a request's model field: Stack("domain", "sql")

__all__ = [
    "BATCHING",
    "Engine",
    "EngineStats",
    "Job",
    "Row",
    "SamplingParams",
    "ServeError",
    "StreamChunk",
    "check_adapter_folder",
    "check_adapter_name",
]


@dataclass
class AdminOp:
    """An adapter load or unload, queued with the requests so it runs in arrival order. A load
    on demand has no future: the rows queued behind it wait for it (or get its error)."""

    kind: str  # "load" | "unload"
    name: str
    path: str | None
    future: asyncio.Future[dict[str, Any]] | None
    on_demand: bool = False


@dataclass
class EngineStats:
    """What the worker has done. A batch is one model batch: a decoding step (continuous) or a
    ``generate`` call (static); mixed batches hold rows for more than one adapter (or the base)."""

    batches: int = 0
    rows: int = 0  # rows summed over batches
    mixed_batches: int = 0
    max_batch_rows: int = 0
    prefills: int = 0  # prefill calls of rows joining a running batch (continuous)
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    rejected_full: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)

    def add_batch(self, rows: int, adapters: int) -> None:
        self.batches += 1
        self.rows += rows
        self.batch_sizes[rows] += 1
        self.max_batch_rows = max(self.max_batch_rows, rows)
        self.mixed_batches += adapters > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "mixed_batches": self.mixed_batches,
            "max_batch_rows": self.max_batch_rows,
            "mean_batch_rows": round(self.rows / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "prefills": self.prefills,
            "generated_tokens": self.generated_tokens,
            "busy_seconds": round(self.busy_seconds, 3),
            "rejected_queue_full": self.rejected_full,
        }


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
        batching: str = "continuous",
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        max_prompt_tokens: int | None = None,
        max_tokens_limit: int | None = None,
        max_prompts: int = 16,
        max_prefill_tokens: int = 2048,
        adapter_paths: dict[str, str] | None = None,
        adapter_dirs: Sequence[str] = (),
        max_loaded_adapters: int | None = None,
        small_batch_matmul: str = "auto",
    ) -> None:
        if not isinstance(model, PeftModel):
            raise TypeError("Engine needs a peftlab PeftModel (PeftModel(base) makes one with no adapter)")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        for value, flag in (
            (max_batch_size, "max_batch_size"),
            (max_queue, "max_queue"),
            (max_prompts, "max_prompts"),
            (max_prefill_tokens, "max_prefill_tokens"),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_prompts = max_prompts
        self.max_prefill_tokens = max_prefill_tokens
        # an encoder-decoder reads the prompt in its encoder and writes the completion in its decoder
        self.seq2seq = is_encoder_decoder(model.base_model)
        # positions the model was trained for; prompt + completion must fit in them (in one
        # sequence, or the prompt in the encoder's and the completion in the decoder's)
        context = getattr(getattr(model.base_model, "config", None), "max_position_embeddings", None)
        self.context_length: int | None = int(context) if context else None
        self.max_prompt_tokens = max_prompt_tokens or (
            self.context_length - (0 if self.seq2seq else 1) if self.context_length else 4096
        )
        self.max_tokens_limit = max_tokens_limit or (self.context_length or 4096)
        for value, flag in (
            (self.max_prompt_tokens, "max_prompt_tokens"),
            (self.max_tokens_limit, "max_tokens_limit"),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        check_adapter_limit(max_loaded_adapters, list(model.peft_config), adapter_dirs)
        self.roots = AdapterRoots(adapter_dirs)
        # None: adapters load only when named at start-up or by POST /v1/adapters; N: a request
        # naming a folder in a root loads it, and at most N adapters stay loaded
        self.max_loaded_adapters = max_loaded_adapters
        self.adapters: dict[str, dict[str, Any]] = {}  # name -> {"method", "path"}; loop thread only
        self._recency: dict[str, None] = {}  # loaded adapters, least recently used first
        self._loading: dict[str, AdminOp] = {}  # loads on demand queued or running
        for name in model.peft_config:
            self._register(name, (adapter_paths or {}).get(name))
        # never evicted: the operator's choice (start-up and POST /v1/adapters), maybe not on disk
        self.pinned: set[str] = set(self.adapters)
        self.stats = EngineStats()
        self.metrics = ServeMetrics(self.queue_depth, lambda: self.running_rows, lambda: len(self.adapters))
        self.running_rows = 0  # rows handed to the model worker right now
        self.draining = False  # shutting down: running and queued rows finish, new ones get 503
        self.created = int(time.time())
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # decoding steps of few rows: F.linear as weight @ x^T on an MKL CPU (serving/small_batch.py)
        self.small_matmul = small_batch_wanted(small_batch_matmul, self._device)
        self.eos_ids = eos_ids(model.base_model, tokenizer)
        self._pad = pad_id(tokenizer, self.eos_ids)
        self.rules = StopRules(tokenizer, self.eos_ids, self._emit)
        batch_class = EncoderDecoderBatch if self.seq2seq else RunningBatch
        self._batch = (
            batch_class(
                model,
                self.rules,
                self._pad,
                max_prefill_tokens=max_prefill_tokens,
                small_batch_matmul=self.small_matmul,
            )
            if batching == "continuous"
            else None
        )
        self._waiting: deque[Row | AdminOp] = deque()
        self._job_seconds = 1.0  # running mean of a request's time in the server (Retry-After)
        self._arrived: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="peftlab-model")
        run = self._run_continuous if self.batching == "continuous" else self._run_static
        self._dispatcher = asyncio.create_task(run(), name="peftlab-dispatch")

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the engine runs on, once started."""
        return self._loop

    def begin_drain(self) -> None:
        """Stop taking requests (503); what is queued or running goes on to the end."""
        self.draining = True

    async def stop(self) -> None:
        """Stop the worker; what is still queued or running is answered 503."""
        self.draining = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            # the step running now ends first; the event loop keeps answering meanwhile
            await asyncio.to_thread(executor.shutdown, True)
        err = ServeError(503, "the server is shutting down", kind="server_error")
        while self._waiting:
            item = self._waiting.popleft()
            if isinstance(item, Row):
                item.job.fail(err)
            elif item.future is not None and not item.future.done():
                item.future.set_exception(err)
        self._loading.clear()
        if self._batch is not None:
            for row in self._batch.clear():
                row.job.fail(err)
        self.running_rows = 0

    def run_on_worker(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the model worker's thread, between batches (tests, maintenance)."""
        if self._executor is None:
            raise ServeError(503, "the model worker is not running", kind="server_error")
        return self._executor.submit(fn, *args)

    # ---- what clients see -----------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def resolve(self, model: str) -> str | Stack:
        """The route a request's ``model`` field names: an adapter, ``"__base__"`` for the base
        model, or a ``Stack`` for adapters joined with ``+`` (``"domain+sql"``: the row runs through
        ``Stack("domain", "sql")``, as ``set_adapter(Stack("domain", "sql"))`` would run it)."""
        if model in (self.base_name, BASE_ADAPTER):
            return BASE_ADAPTER
        if model in self.adapters or self._loadable(model):
            return model
        if COMPOSE in model:
            return self._composed(model)
        raise ServeError(
            404,
            f"model {model!r} is not loaded; available models: {', '.join(self.model_names())}",
            kind="not_found_error",
            param="model",
        )

    def _composed(self, model: str) -> Stack:
        """``"a+b"`` as ``Stack("a", "b")``: 400 for what composition refuses (an empty part, the
        base model as a part, an adapter named twice), 404 naming a part that is not loaded."""
        parts = model.split(COMPOSE)
        for i, part in enumerate(parts, 1):
            if not part:
                raise ServeError(
                    400,
                    f"model {model!r}: part {i} is empty; compose adapters as 'a+b' (adapter names joined "
                    "with '+')",
                    param="model",
                )
            if part in (self.base_name, BASE_ADAPTER):
                raise ServeError(
                    400,
                    f"model {model!r}: the base model {part!r} cannot be part of a composition; compose "
                    "adapter names only (every composition runs on the base model)",
                    param="model",
                )
        try:
            stack = Stack(*parts)
        except ValueError as err:  # the library's refusal (an adapter named twice)
            raise ServeError(400, f"model {model!r} cannot be composed: {err}", param="model") from None
        limit = self.max_loaded_adapters
        if limit is not None and len(parts) > limit:
            raise ServeError(
                400,
                f"model {model!r} composes {len(parts)} adapters, but this server keeps at most {limit} "
                "loaded (--max-loaded-adapters)",
                param="model",
            )
        for part in parts:
            if part not in self.adapters and not self._loadable(part):
                raise ServeError(
                    404,
                    f"model {model!r}: no adapter named {part!r} is loaded; available adapters: "
                    f"{', '.join(self.adapters) or 'none'}",
                    kind="not_found_error",
                    param="model",
                )
        return stack

    def _loadable(self, name: str) -> bool:
        """Whether a request naming ``name`` (not loaded) loads it on demand: a folder of that
        name in a root, confined as ``POST /v1/adapters`` paths are (403 / 400 otherwise)."""
        if self.max_loaded_adapters is None:
            return False
        if name in self._loading:
            return True
        if not on_disk(self.roots.roots, name):
            return False
        check_adapter_name(name, self.base_name)
        self.roots.confine(name)
        return True

    def queue_depth(self) -> int:
        return len(self._waiting)

    def encode(self, prompt: str, *, special_tokens: bool = True) -> list[int]:
        with self.rules.lock:
            return list(self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"])

    def check_lengths(self, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> None:
        if len(prompt_ids) > self.max_prompts:
            raise ServeError(
                400,
                f"{len(prompt_ids)} prompts in one request; this server takes at most {self.max_prompts}",
                param="prompt",
            )
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
            if self.context_length and not self.seq2seq and len(ids) + max_tokens > self.context_length:
                raise ServeError(
                    400,
                    f"{which} ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                    f"context length of {self.context_length} tokens; shorten the prompt or lower max_tokens",
                    param="max_tokens",
                )

    def submit(
        self,
        adapter: str | Stack,
        prompt_ids: Sequence[list[int]],
        params: SamplingParams,
        *,
        stream: bool = False,
        model: str | None = None,
    ) -> Job:
        """Queue one request (one row per prompt); 503 when the queue cannot take all its rows
        or the server is shutting down. ``model`` is the name the client used (for metrics)."""
        loop = self._require_started()
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise ServeError(
                503,
                "the server is shutting down and takes no new requests; retry on another instance",
                kind="server_error",
                headers={"Retry-After": "5", "Connection": "close"},
            )
        if len(prompt_ids) > self.max_queue:
            # never fits, however long the client waits: not "busy"
            raise ServeError(
                400,
                f"{len(prompt_ids)} prompts in one request, but this server queues at most {self.max_queue}; "
                f"send at most {self.max_queue} per request",
                param="prompt",
            )
        free = self.max_queue - len(self._waiting)
        if len(prompt_ids) > free:
            self.stats.rejected_full += 1
            self.metrics.rejected.labels("queue_full").inc()
            raise ServeError(
                503,
                f"the server is busy ({len(self._waiting)} prompts queued, at most {self.max_queue}); "
                "retry shortly",
                kind="server_error",
                headers={"Retry-After": str(self._retry_after())},
            )
        default = self.base_name if adapter == BASE_ADAPTER else COMPOSE.join(route_names(adapter))
        job = Job(loop, stream, model or default)
        for name in route_names(adapter):
            if name == BASE_ADAPTER:
                continue
            if name in self._recency:
                self._recency[name] = self._recency.pop(name)  # most recently used
            elif name not in self._loading:
                # the first request for an unloaded adapter queues its load; later ones (and
                # this request's rows) wait behind it
                op = AdminOp("load", name, str(self.roots.confine(name)), None, on_demand=True)
                self._loading[name] = op
                self._waiting.append(op)
        for i, ids in enumerate(prompt_ids):
            row = Row(adapter, list(ids), params, job, i)
            job.rows.append(row)
            self._waiting.append(row)
        job.pending = len(job.rows)
        self._wake()
        return job

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load a PEFT-format adapter folder inside the adapter roots between batches: 403 when
        run-time loading is off or the folder lies outside the roots, 400 for a bad name or folder."""
        folder = self.roots.confine(path)
        check_adapter_name(name, self.base_name)
        if name in self.adapters:
            raise ServeError(
                409, f"adapter {name!r} is loaded already; DELETE /v1/adapters/{name} first", param="name"
            )
        return await self._admin("load", name, str(folder))

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        """Unload after every request queued before this call has run."""
        self.roots.require_enabled("unloading adapters")
        if name not in self.adapters:
            raise ServeError(
                404,
                f"no adapter named {name!r} is loaded; loaded adapters: {', '.join(self.adapters) or 'none'}",
                kind="not_found_error",
            )
        return await self._admin("unload", name, None)

    # ---- internals ---------------------------------------------------------------------------
    def _require_started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._dispatcher is None:
            raise ServeError(503, "the model worker is not running", kind="server_error")
        return self._loop

    def _wake(self) -> None:
        assert self._arrived is not None
        self._arrived.set()

    async def _until_arrival(self, timeout: float | None = None) -> bool:
        """Wait for something to be queued; False on timeout."""
        assert self._arrived is not None
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _retry_after(self) -> int:
        waves = len(self._waiting) / self.max_batch_size + 1
        return max(1, math.ceil(waves * self._job_seconds))

    def _register(self, name: str, path: str | None) -> None:
        config = self.model.peft_config[name]
        self.adapters[name] = {"method": str(config.peft_type), "path": path}
        self._recency[name] = None

    def _forget(self, name: str) -> dict[str, Any]:
        """Take an adapter out of the served set (before the model drops it)."""
        self._recency.pop(name, None)
        self.pinned.discard(name)
        return self.adapters.pop(name)

    def _emit(self, row: Row, chunk: StreamChunk) -> None:
        """Called on the worker's thread: hand a stream chunk to the event loop."""
        loop = row.job.loop
        if not loop.is_closed():
            loop.call_soon_threadsafe(row.job.push, chunk)

    async def _admin(self, kind: str, name: str, path: str | None) -> dict[str, Any]:
        loop = self._require_started()
        if len(self._waiting) >= self.max_queue:
            self.stats.rejected_full += 1
            self.metrics.rejected.labels("queue_full").inc()
            raise ServeError(
                503,
                "the server is busy (queue full); retry the adapter operation shortly",
                kind="server_error",
                headers={"Retry-After": str(self._retry_after())},
            )
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting.append(AdminOp(kind, name, path, future))
        self._wake()
        return await future

    def _usable(self, row: Row) -> bool:
        """False (and the job answered) for a row whose request is over or whose adapter went."""
        if row.job.cancelled:
            self._count_cancelled(row.job)
            return False
        if row.job.finished:
            return False
        gone = [n for n in route_names(row.adapter) if n != BASE_ADAPTER and n not in self.adapters]
        if gone:
            self.metrics.requests.labels(row.job.model, "error").inc()
            row.job.fail(
                ServeError(
                    404,
                    f"adapter {gone[0]!r} was unloaded before this request ran; available "
                    f"models: {', '.join(self.model_names())}",
                    kind="not_found_error",
                    param="model",
                )
            )
            return False
        return True

    def _ended(self, rows: Sequence[Row]) -> None:
        """Rows the worker has finished with: count them, complete their jobs."""
        for row in rows:
            self.stats.generated_tokens += len(row.tokens)
            if row.job.cancelled:
                self._count_cancelled(row.job)
            elif row.job.row_done():
                self._job_ended(row.job, "ok")

    def _count_cancelled(self, job: Job) -> None:
        if job.ended is None:  # once per request, however many of its rows were dropped
            job.ended = time.perf_counter()
            self._job_ended(job, "cancelled")

    def _job_ended(self, job: Job, outcome: str) -> None:
        self.metrics.requests.labels(job.model, outcome).inc()
        if outcome != "ok" or job.ended is None:
            return
        seconds = job.ended - job.created
        self._job_seconds = 0.9 * self._job_seconds + 0.1 * seconds
        self.metrics.latency.observe(seconds)
        first = job.first_token_at
        if first is not None:
            self.metrics.ttft.observe(first - job.created)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in job.rows))

    def _fail_rows(self, rows: Sequence[Row], err: Exception) -> None:
        for row in rows:
            if not row.job.finished:
                row.job.fail(ServeError(500, f"generation failed: {err}", kind="server_error"))
                self.metrics.requests.labels(row.job.model, "error").inc()

    # ---- continuous batching -----------------------------------------------------------------
    def _op_ready(self, op: AdminOp) -> bool:
        """An unload waits for the running rows of its adapter; a load runs at once."""
        assert self._batch is not None
        rows = [*self._batch.rows, *self._batch.prefilling]
        return op.kind != "unload" or all(op.name not in route_names(r.adapter) for r in rows)

    def _admissions(self) -> list[Row]:
        """Rows from the front of the queue that join at the next step (stops at an adapter op)."""
        assert self._batch is not None
        if self._batch.prefills:
            return []  # this step's prefill budget goes to the next chunk of a long prompt
        room = self.max_batch_size - len(self._batch.rows)
        taken: list[Row] = []
        tokens = 0
        while self._waiting and len(taken) < room:
            head = self._waiting[0]
            if isinstance(head, AdminOp):
                break
            if not self._usable(head):
                self._waiting.popleft()
                continue
            if taken and tokens + len(head.prompt_ids) > self.max_prefill_tokens:
                break
            self._waiting.popleft()
            taken.append(head)
            tokens += len(head.prompt_ids)
        return taken

    async def _run_continuous(self) -> None:
        assert self._batch is not None and self._executor is not None
        batch, loop = self._batch, asyncio.get_running_loop()
        while True:
            head = self._waiting[0] if self._waiting else None
            if isinstance(head, AdminOp) and self._op_ready(head):
                self._waiting.popleft()
                await self._run_admin(head)
                continue
            admit = self._admissions()
            if not admit and not batch.rows and not batch.prefills:
                await self._until_arrival()
                continue
            self.running_rows = len(batch.rows) + len(batch.prefilling) + len(admit)
            start = time.perf_counter()
            try:
                report: StepReport = await loop.run_in_executor(self._executor, batch.step, admit)
            except Exception as err:
                log.exception("a decoding step failed")
                self._fail_rows([*batch.clear(), *admit], err)
                self.running_rows = 0
                continue
            finally:
                self.stats.busy_seconds += time.perf_counter() - start
            self.running_rows = len(batch.rows) + len(batch.prefilling)
            if report.prefilled:
                self.stats.prefills += 1
            if report.decoded:
                self.stats.add_batch(report.decoded, report.adapters)
                self.metrics.batch_size.observe(report.decoded)
            self.metrics.add_tokens(report.new_tokens)
            self._ended(report.left)

    # ---- static batching ---------------------------------------------------------------------
    def _rows_in_front(self) -> int:
        count = 0
        for item in self._waiting:
            if isinstance(item, AdminOp):
                break
            count += 1
        return count

    async def _run_static(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                await self._until_arrival()
                continue
            head = self._waiting[0]
            if isinstance(head, AdminOp):
                self._waiting.popleft()
                await self._run_admin(head)
                continue
            deadline = loop.time() + self.max_wait
            while self._rows_in_front() < self.max_batch_size and self._rows_in_front() == len(self._waiting):
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._until_arrival(remaining):
                    break
            batch: list[Row] = []
            while self._waiting and len(batch) < self.max_batch_size:
                item = self._waiting[0]
                if isinstance(item, AdminOp):
                    break  # adapter ops run between batches, in arrival order
                self._waiting.popleft()
                if self._usable(item):
                    batch.append(item)
            if batch:
                await self._run_static_batch(batch)

    async def _run_static_batch(self, rows: list[Row]) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        self.running_rows = len(rows)
        try:
            await loop.run_in_executor(
                self._executor, generate_batch, self.model, self.rules, rows, self._pad, self.small_matmul
            )
        except Exception as err:
            log.exception("generation failed for a batch of %d", len(rows))
            self._fail_rows(rows, err)
            return
        finally:
            self.running_rows = 0
            self.stats.busy_seconds += time.perf_counter() - start
        self.stats.add_batch(len(rows), len({r.adapter for r in rows}))
        self.metrics.batch_size.observe(len(rows))
        self.metrics.add_tokens(sum(len(r.tokens) for r in rows))
        self._ended(rows)

    # ---- adapter operations ------------------------------------------------------------------
    async def _run_admin(self, op: AdminOp) -> None:
        try:
            result = await self._admin_result(op)
        except Exception as err:  # the worker must survive anything an adapter op raises
            error = self._admin_error(op, err)
            if op.on_demand:
                self._fail_waiting(op.name, error)
            if op.future is not None and not op.future.done():
                op.future.set_exception(error)
            return
        finally:
            if op.on_demand:
                self._loading.pop(op.name, None)
        if op.future is not None and not op.future.done():
            op.future.set_result(result)

    async def _admin_result(self, op: AdminOp) -> dict[str, Any]:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        if op.kind == "unload":
            if op.name not in self.adapters:
                raise ServeError(404, f"no adapter named {op.name!r} is loaded", kind="not_found_error")
            info = self._forget(op.name)
            await loop.run_in_executor(self._executor, self.model.delete_adapter, op.name)
            return {"id": op.name, "object": "adapter", "deleted": True, **info}
        if op.name in self.adapters:
            if op.on_demand:  # loaded by a POST queued before this load
                return self.adapters[op.name]
            raise ServeError(409, f"adapter {op.name!r} is loaded already", param="name")
        await self._make_room(op.name)
        trigger = "on_demand" if op.on_demand else "request"
        start = time.perf_counter()
        try:
            await loop.run_in_executor(self._executor, self._load, op.name, op.path)
        except BaseException:
            self.metrics.adapter_loads.labels(trigger, "error").inc()
            raise
        finally:
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)
        self.metrics.adapter_loads.labels(trigger, "ok").inc()
        self._register(op.name, op.path)
        if not op.on_demand:
            self.pinned.add(op.name)
        return {"id": op.name, "object": "adapter", **self.adapters[op.name]}

    def _admin_error(self, op: AdminOp, err: Exception) -> ServeError:
        """What the client of a failed adapter op reads (a load on demand: every request waiting
        for it)."""
        if isinstance(err, ServeError):
            return err
        if op.on_demand:
            log.warning("adapter %r failed to load on demand from %s: %s", op.name, op.path, err)
            return ServeError(
                500,
                f"adapter {op.name!r} failed to load from its folder under --adapter-dir: {err}",
                kind="server_error",
                param="model",
            )
        if isinstance(err, (ValueError, TypeError, FileNotFoundError, OSError)):
            return ServeError(400, f"cannot load adapter {op.name!r}: {err}", param="path")
        log.error("adapter %s of %r failed", op.kind, op.name, exc_info=err)
        return ServeError(500, f"adapter {op.kind} failed: {err}", kind="server_error")

    def _fail_waiting(self, name: str, err: ServeError) -> None:
        """Answer every queued request that needs adapter ``name`` with ``err``."""
        kept: deque[Row | AdminOp] = deque()
        for item in self._waiting:
            if isinstance(item, Row) and name in route_names(item.adapter):
                if not item.job.finished:
                    item.job.fail(err)
                    self.metrics.requests.labels(item.job.model, "error").inc()
            else:
                kept.append(item)
        self._waiting = kept

    def _in_use(self) -> set[str]:
        """Adapters a running or queued row needs."""
        rows = [r for r in self._waiting if isinstance(r, Row)]
        if self._batch is not None:
            rows += [*self._batch.rows, *self._batch.prefilling]  # rows still prefilling need theirs too
        return {name for row in rows for name in route_names(row.adapter)}

    async def _make_room(self, loading: str) -> None:
        """With ``max_loaded_adapters`` loaded, unload the least recently used adapter that no
        running or queued row needs and that was loaded on demand (the operator's are pinned)."""
        limit = self.max_loaded_adapters
        if limit is None or len(self.adapters) < limit:
            return
        assert self._executor is not None
        evictable = [n for n in self._recency if n not in self.pinned]
        if not evictable:
            raise ServeError(
                409,
                f"cannot load adapter {loading!r}: the {len(self.adapters)} adapters loaded "
                f"(--max-loaded-adapters {limit}) were all named at start-up or loaded with POST "
                "/v1/adapters; unload one with DELETE /v1/adapters/NAME first",
                kind="server_error",
                param="model",
            )
        busy = self._in_use()
        idle = [n for n in evictable if n not in busy]
        if not idle:
            raise ServeError(
                503,
                f"cannot load adapter {loading!r} now: all {limit} adapter slots (--max-loaded-adapters) "
                "hold adapters that running or queued requests use; retry shortly",
                kind="server_error",
                param="model",
                headers={"Retry-After": str(self._retry_after())},
            )
        victim = idle[0]
        self._forget(victim)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.model.delete_adapter, victim)
        self.metrics.adapter_evictions.inc()
        log.info("adapter %r unloaded (least recently used) to load %r", victim, loading)

    def _load(self, name: str, path: str | None) -> None:
        assert path is not None
        try:
            self.model.load_adapter(path, adapter_name=name)
        except BaseException:
            if name in self.model.peft_config:  # never half an adapter
                self.model.delete_adapter(name)
            raise
        self.model.to(self._device)
