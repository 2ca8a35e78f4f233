"""``peftlab serve``: one base model, many adapters of any method, chosen per request and batched
together (see :mod:`peftlab.serving.engine`), behind an OpenAI-compatible HTTP API
(:mod:`peftlab.serving.api`, which needs the ``serve`` extra: FastAPI and uvicorn)."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peftlab.core.peft_model import PeftModel
from peftlab.extras import require
from peftlab.models import ALIASES, DEFAULT_CAUSAL_LM, load_causal_lm
from peftlab.serving.engine import (
    Engine,
    EngineStats,
    SamplingParams,
    ServeError,
    check_adapter_folder,
    check_adapter_name,
)

__all__ = [
    "Engine",
    "EngineStats",
    "SamplingParams",
    "ServeError",
    "base_model_name",
    "load_engine",
    "serve_forever",
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
    **engine_options: Any,
) -> Engine:
    """Load a causal LM (``None``: the embedded SmolLM2-135M) and the named adapter folders,
    and wrap them in an :class:`Engine` (options: ``max_batch_size``, ``max_wait_ms``, ...)."""
    base_name = served_model_name or base_model_name(model, gguf_file)
    adapters = dict(adapters or {})
    folders = {}
    for name, path in adapters.items():
        try:
            check_adapter_name(name, base_name)
            folders[name] = str(check_adapter_folder(path))
        except ServeError as err:
            raise ValueError(f"--adapter {name}={path}: {err.message}") from None
    base, tokenizer = load_causal_lm(model, gguf_file=gguf_file, dtype=dtype)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    """uvicorn, once FastAPI and uvicorn are known to be installed (else a one-line error)."""
    require("fastapi", "peftlab serve")
    return require("uvicorn", "peftlab serve")


def serve_forever(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``engine`` over HTTP until interrupted (uvicorn; the ``serve`` extra)."""
    uvicorn = require_server()
    from peftlab.serving.api import create_app

    if not api_key and not is_loopback(host):
        print(
            f"peftlab serve: warning: listening on {host} without an API key; anyone who can reach "
            "this port can use the model and load adapters from this machine's files (set --api-key)",
            file=sys.stderr,
        )
    print(
        f"peftlab serve: {engine.base_name} with adapters {list(engine.adapters) or 'none'} on "
        f"http://{host}:{port} (max batch {engine.max_batch_size}, context "
        f"{engine.context_length or 'unknown'})",
        file=sys.stderr,
    )
    uvicorn.run(create_app(engine, api_key=api_key), host=host, port=port, log_level=log_level)
