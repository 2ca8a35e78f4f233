"""``peftlab serve``: one base model, many adapters of any method, chosen per request and batched
together at every decoding step (see :mod:`peftlab.serving.engine`), behind an
OpenAI-compatible HTTP API (:mod:`peftlab.serving.api`). Needs the ``serve`` extra: FastAPI,
uvicorn and prometheus-client."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from peftlab.core.peft_model import PeftModel
from peftlab.devices import resolve_device
from peftlab.extras import require
from peftlab.models import ALIASES, DEFAULT_CAUSAL_LM, load_language_model, model_kind
from peftlab.serving.adapters import check_adapter_folder, check_adapter_limit, check_adapter_name
from peftlab.serving.engine import BATCHING, Engine, EngineStats, SamplingParams, ServeError
from peftlab.serving.small_batch import check_choice as check_small_batch_choice

__all__ = [
    "BATCHING",
    "Engine",
    "EngineStats",
    "SamplingParams",
    "ServeError",
    "base_model_name",
    "load_engine",
    "serve_forever",
    "startup_warnings",
]


def base_model_name(name_or_path: str | None, gguf_file: str | None = None) -> str:
    """The name clients use for the base model: the alias, a folder's name, a GGUF file's stem."""
    if name_or_path is None or name_or_path.lower() in ALIASES:
        return DEFAULT_CAUSAL_LM
    if gguf_file:
        return Path(gguf_file).stem
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else name_or_path


def load_engine(
    model: str | None = None,
    *,
    gguf_file: str | None = None,
    adapters: Mapping[str, str] | None = None,
    served_model_name: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    quantization: Any = None,
    double_quant: bool = False,
    **engine_options: Any,
) -> Engine:
    """Load a causal LM (``None``: the embedded SmolLM2-135M) or an encoder-decoder (T5, BART; the
    kind from :func:`peftlab.models.model_kind`) and the named adapter folders, and wrap them in
    an :class:`Engine` (options: ``batching``, ``max_batch_size``, ``adapter_dirs``, ...).
    An encoder-only model is refused before anything is loaded. ``quantization`` (``"nf4"``,
    ``"fp4"``, ``"int8"`` or a ``BitsAndBytesConfig``) serves every adapter over one quantized
    base, as :func:`peftlab.models.load_base_model` loads it."""
    adapters = dict(adapters or {})
    # refused before anything is loaded
    check_small_batch_choice(engine_options.get("small_batch_matmul", "auto"))
    check_adapter_limit(
        engine_options.get("max_loaded_adapters"), list(adapters), engine_options.get("adapter_dirs", ())
    )
    kind = model_kind(model, gguf_file)
    if kind not in ("causal", "seq2seq"):
        raise ValueError(
            f"{model} is an {kind}-only model, which does not generate text; peftlab serve needs a causal "
            "LM or an encoder-decoder (T5, BART) as --model"
        )
    base_name = served_model_name or base_model_name(model, gguf_file)
    folders = {}
    for name, path in adapters.items():
        try:
            check_adapter_name(name, base_name)
            folders[name] = str(check_adapter_folder(path))
        except ServeError as err:
            raise ValueError(f"--adapter {name}={path}: {err.message}") from None
    target = resolve_device(device or "auto")
    quant: dict[str, Any] = {}
    if quantization is not None:  # quantized straight onto the device
        quant = {"quantization": quantization, "double_quant": double_quant, "device": target}
    base, tokenizer = load_language_model(model, kind=kind, gguf_file=gguf_file, dtype=dtype, **quant)
    peft_model = PeftModel(base)
    for name, folder in folders.items():
        peft_model.load_adapter(folder, adapter_name=name)
    peft_model.to(target)
    peft_model.eval()
    return Engine(peft_model, tokenizer, base_name=base_name, adapter_paths=folders, **engine_options)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_server() -> Any:
    """uvicorn, once FastAPI, uvicorn and prometheus-client are known to be installed (else a
    one-line error naming the install)."""
    require("fastapi", "peftlab serve")
    require("prometheus_client", "peftlab serve")
    return require("uvicorn", "peftlab serve")


def startup_warnings(host: str, api_key: str | None, engine: Engine) -> list[str]:
    """What an operator must hear before the server takes requests."""
    if api_key or is_loopback(host):
        return []
    reach = "use the model"
    if engine.roots.enabled:
        dirs = ", ".join(str(r) for r in engine.roots.roots)
        reach += f" and load or unload adapters from {dirs}"
    return [
        f"peftlab serve: warning: listening on {host} without an API key: anyone who can reach this "
        f"port can {reach}. Set --api-key KEY (or $PEFTLAB_API_KEY), or bind 127.0.0.1"
    ]


@contextlib.contextmanager
def _sigterm_ends_quietly() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once it has shut down; with the default
    SIGTERM action that would kill the process (exit 143) after a clean shutdown, so SIGTERM
    gets a handler that does nothing for that moment."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_forever(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log_level: str = "info",
    max_body_bytes: int | None = None,
    shutdown_grace: float = 30.0,
) -> None:
    """Serve ``engine`` over HTTP until SIGTERM or Ctrl-C (uvicorn; the ``serve`` extra).

    On SIGTERM the server stops accepting connections and requests, lets running and queued
    requests finish for up to ``shutdown_grace`` seconds, cancels what is left, and returns.
    """
    uvicorn = require_server()
    from peftlab.serving.api import MAX_BODY_BYTES, create_app

    if shutdown_grace < 0:
        raise ValueError(f"shutdown_grace must be >= 0 seconds, got {shutdown_grace}")
    for line in startup_warnings(host, api_key, engine):
        print(line, file=sys.stderr)
    loading = (
        f"run-time adapter loading from {', '.join(str(r) for r in engine.roots.roots)}"
        if engine.roots.enabled
        else "run-time adapter loading off"
    )
    if engine.max_loaded_adapters is not None:
        loading += f", on demand, at most {engine.max_loaded_adapters} loaded"
    print(
        f"peftlab serve: {engine.base_name} with adapters {list(engine.adapters) or 'none'} on "
        f"http://{host}:{port} ({engine.batching} batching, max batch {engine.max_batch_size}, context "
        f"{engine.context_length or 'unknown'}, small-batch matmul {'on' if engine.small_matmul else 'off'}, "
        f"{loading})",
        file=sys.stderr,
    )
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes or MAX_BODY_BYTES)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_grace
    )

    def announce(name: str) -> None:
        print(
            f"peftlab serve: {name}: taking no new requests; finishing {engine.running_rows} running and "
            f"{engine.queue_depth()} queued prompts (at most {shutdown_grace:g} s)",
            file=sys.stderr,
            flush=True,
        )

    class Server(uvicorn.Server):  # type: ignore[misc, name-defined]
        async def shutdown(self, sockets: Any = None) -> None:
            # what still runs when the grace is nearly over is answered by the engine, a JSON 503
            # "shutting down" (a stream: its error event), before uvicorn cancels the requests'
            # tasks, which would answer a plain-text 500 and log a traceback for each
            async def answer_the_rest() -> None:
                await asyncio.sleep(max(0.0, shutdown_grace - min(1.0, shutdown_grace / 2)))
                await engine.stop()

            last = asyncio.ensure_future(answer_the_rest())
            try:
                await super().shutdown(sockets)
            finally:
                last.cancel()

        def handle_exit(self, sig: int, frame: Any) -> None:
            # a signal handler: set flags only, and say what happens from the event loop (a
            # print here could land inside another write to stderr)
            if not engine.draining:
                engine.begin_drain()
                loop = engine.loop
                if loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(announce, signal.Signals(sig).name)
            super().handle_exit(sig, frame)

    with _sigterm_ends_quietly():
        Server(config).run()
    print("peftlab serve: stopped", file=sys.stderr)
