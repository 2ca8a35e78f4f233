"""``peftlab serve``: an OpenAI-compatible HTTP server for one base model and many adapters of
any method, the adapter chosen per request and requests for different adapters batched together
at every decoding step."""

from __future__ import annotations

import argparse
import os
from typing import Any

from peftlab.devices import DEVICE_HELP, DTYPE_HELP, resolve_device, resolve_dtype


def _adapter(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=PATH, e.g. --adapter sql=out/lora-sql")
    return name.strip(), path.strip()


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return n


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return n


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="HTTP server: one base model, many adapters, adapter chosen per request, mixed batches",
        description=(
            "Serve a causal LM or an encoder-decoder (T5, BART: the prompt is the encoder's input) and "
            "any number of adapters (LoRA, IA3, bottleneck, prefix) behind an "
            "OpenAI-compatible API: POST /v1/completions and /v1/chat/completions with model=ADAPTER "
            "(or the base model's name, or A+B for the adapters stacked: Stack('A', 'B')), GET /v1/models, "
            "GET /health, GET /metrics (Prometheus). "
            "Requests for different adapters share one batch that changes at every decoding step. "
            "With --adapter-dir, POST /v1/adapters {name, path} and DELETE /v1/adapters/NAME load and "
            "unload adapters inside those folders while serving. SIGTERM stops taking requests, "
            "finishes the running ones (--shutdown-grace) and exits 0. "
            "Needs the serve extra: pip install 'peftlab[serve]'."
        ),
    )
    p.add_argument("--model", help="HF id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument(
        "--adapter",
        action="append",
        type=_adapter,
        default=[],
        metavar="NAME=PATH",
        help="an adapter folder saved by save_pretrained, served as model NAME (repeatable)",
    )
    p.add_argument(
        "--adapter-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="allow loading adapters at run time from folders inside DIR (repeatable; default: off, "
        "the adapters given at startup are all there is)",
    )
    p.add_argument(
        "--max-loaded-adapters",
        type=_positive,
        metavar="N",
        help="with --adapter-dir: a request naming an adapter that is not loaded loads the folder of that "
        "name inside a --adapter-dir (once, however many requests wait for it), and at most N adapters "
        "stay loaded: the least recently used one that no running or queued request needs, and that was "
        "loaded this way, is unloaded first (--adapter ones count toward N and stay; default: no on-demand "
        "loading)",
    )
    p.add_argument("--served-model-name", help="name of the base model in requests (default: from --model)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every request (default: $PEFTLAB_API_KEY if set)",
    )
    p.add_argument(
        "--batching",
        choices=("continuous", "static"),
        default="continuous",
        help="continuous: rows join and leave the batch at every decoding step (default; encoder-decoders "
        "T5 and BART); static: a batch runs to its longest row's end",
    )
    p.add_argument("--max-batch-size", type=_positive, default=16, help="rows decoded together (default 16)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="static batching: how long a batch waits for more requests after its first (default 10)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=_positive,
        default=2048,
        help="continuous batching: prompt tokens prefilled in one step at most; a longer prompt is "
        "prefilled in chunks of this size, one per decoding step of the running rows (causal models; "
        "an encoder-decoder's encoder reads a prompt whole) (default 2048)",
    )
    p.add_argument(
        "--small-batch-matmul",
        choices=("auto", "on", "off"),
        default="auto",
        help="decoding steps of at most 4 rows compute each fp32 linear layer as weight @ x^T, which "
        "torch's MKL build runs faster than x @ weight^T for so few rows (auto: on the CPU of an "
        "MKL build; outputs equal within float rounding) (default auto)",
    )
    p.add_argument(
        "--max-queue", type=_positive, default=256, help="prompts waiting at most; more get 503 (default 256)"
    )
    p.add_argument(
        "--max-prompt-tokens", type=_positive, help="longest prompt accepted (default: context length - 1)"
    )
    p.add_argument(
        "--max-tokens-limit", type=_positive, help="largest max_tokens accepted (default: context length)"
    )
    p.add_argument(
        "--max-prompts", type=_positive, default=16, help="prompts in one completions request (default 16)"
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=1 << 20,
        help="largest request body accepted; larger ones get 413 (default 1 MiB)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=30.0,
        help="on SIGTERM, seconds running requests get to finish before they are cancelled (default 30)",
    )
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--dtype", default="float32", help=f"the weights' dtype: {DTYPE_HELP} (default float32)")
    p.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="serve over a base quantized by bitsandbytes: nf4, fp4 or int8 (needs pip install "
        "'peftlab[quant]'; adapters stay fp32)",
    )
    p.add_argument("--double-quant", action="store_true", help="with --quantize nf4/fp4: 8-bit block scales")
    p.add_argument("--threads", type=_positive, help="torch CPU threads")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from peftlab.serving import load_engine, require_server, serve_forever

    require_server()  # before any weights are loaded
    # an unavailable device or a dtype it cannot run: refused before loading too
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    names = [name for name, _ in args.adapter]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--adapter: the names {repeated} are given more than once")
    if args.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = load_engine(
        args.model,
        gguf_file=args.gguf_file,
        adapters=dict(args.adapter),
        served_model_name=args.served_model_name,
        device=str(device),
        dtype=dtype,
        quantization=args.quantize,
        double_quant=args.double_quant,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        batching=args.batching,
        max_prompts=args.max_prompts,
        max_prefill_tokens=args.max_prefill_tokens,
        adapter_dirs=args.adapter_dir,
        max_loaded_adapters=args.max_loaded_adapters,
        small_batch_matmul=args.small_batch_matmul,
    )
    api_key = args.api_key or os.environ.get("PEFTLAB_API_KEY") or None
    serve_forever(
        engine,
        host=args.host,
        port=args.port,
        api_key=api_key,
        log_level=args.log_level,
        max_body_bytes=args.max_body_bytes,
        shutdown_grace=args.shutdown_grace,
    )
    return 0
