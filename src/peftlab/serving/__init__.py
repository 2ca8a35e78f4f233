"""``peftlab serve``: one base model, many adapters of any method, chosen per request and batched
together (see :mod:`peftlab.serving.engine`), behind an OpenAI-compatible HTTP API
(:mod:`peftlab.serving.api`, which needs the ``serve`` extra: FastAPI and uvicorn)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peftlab.serving.engine import Engine, EngineStats, SamplingParams, ServeError

__all__ = ["Engine", "EngineStats", "SamplingParams", "ServeError", "base_model_name", "load_engine"]


def base_model_name(name_or_path: str | None, gguf_file: str | None = None) -> str:
    """The name clients use for the base model: the alias, a folder's name, a GGUF file's stem."""
    from peftlab.models import ALIASES, DEFAULT_CAUSAL_LM

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
    from peftlab.models import load_causal_lm
    from peftlab.peft_model import PeftModel
    from peftlab.serving.engine import check_adapter_folder, check_adapter_name

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
