"""Shared by the ``peftlab serve`` tests: a word-level tokenizer over the tiny models' vocabulary,
adapters of the four methods moved away from identity, the reference outputs of each adapter
alone, engines and loopback servers over saved adapters, and a small HTTP client on the standard
library. (The fixtures built from these, ``folders`` and ``reference``, are in conftest.py.)"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from conftest import VOCAB, build_model
from peftlab import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    TaskType,
    get_peft_model,
)
from peftlab.serving.continuous import RunningBatch
from peftlab.serving.jobs import Job, Row, SamplingParams
from suite_helpers import perturb

if TYPE_CHECKING:
    import pytest

    from peftlab.serving import Engine

EOS, PAD = 2, 0
BASE = "tiny-llama"
METHODS = ("lora", "ia3", "bn", "prefix")
SEQ2SEQ = ("t5", "bart")


def configs(arch: str = "llama") -> dict[str, PeftConfig]:
    """One config per method, made anew each time (a model fills in a prefix config's sizes); an
    encoder-decoder gets a second prefix, in the encoder and cross-attention too (HF PEFT's
    layout has it on decoder self-attention only)."""
    task = TaskType.SEQ_2_SEQ_LM if arch in SEQ2SEQ else TaskType.CAUSAL_LM
    made: dict[str, PeftConfig] = {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        "ia3": IA3Config(init_ia3_weights=False),
        "bn": BottleneckConfig(reduction_factor=4, non_linearity="gelu"),
        "prefix": PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    }
    if arch in SEQ2SEQ:
        made["prefix_all"] = PrefixTuningConfig(
            task_type=task, num_virtual_tokens=2, encoder_prefix=True, cross_prefix=True
        )
    return made


def serve_model(arch: str = "llama") -> torch.nn.Module:
    """The tiny ``arch`` model with the serve tokenizer's special tokens (pad 0, eos 2). BART's
    weights start wider than its default, so that its outputs are not the start token again."""
    if arch == "t5":
        return build_model("t5", eos_token_id=EOS)
    if arch == "bart":
        return build_model("bart", init_std=0.2)
    return build_model(arch)


PROMPTS = ["w5 w9 w13 w40", "w70 w3", "w11 w12 w13 w14 w15 w16 w17", "w88"]
# a chat template of the ChatML kind, in the tiny vocabulary: roles and the turn end are words
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'w90 ' if m['role'] == 'system' else ('w91 ' if m['role'] == 'user' "
    "else 'w92 ') }}{{ m['content'] }} w93 {% endfor %}{% if add_generation_prompt %}w92 {% endif %}"
)


def tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A word-level tokenizer over ``w3`` ... ``w95``, built offline, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": 1, "</s>": EOS} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    tok.chat_template = chat_template
    return tok


def adapted_model(arch: str = "llama", base: torch.nn.Module | None = None) -> PeftModel:
    """A tiny model (``base``, else :func:`serve_model`'s) with one adapter per method, each
    clearly away from identity (not saved)."""
    model = PeftModel(serve_model(arch) if base is None else base)
    for seed, (name, config) in enumerate(configs(arch).items()):
        model.add_adapter(name, config)
        perturb(model.adapter_parameters(name).values(), seed=seed, scale=0.3)
    return model.eval()


def save_adapters(root: Path, arch: str = "llama") -> dict[str, Path]:
    """Each method's adapter, moved clearly away from identity (LoRA B, IA³ scales, the
    bottleneck's up-projection, the prefixes all changed), saved in its own folder."""
    folders = {}
    for seed, (name, config) in enumerate(configs(arch).items()):
        model = get_peft_model(serve_model(arch), config)
        perturb(model.adapter_parameters("default").values(), seed=seed, scale=0.3)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def loaded_model(folders: dict[str, Path], arch: str = "llama") -> PeftModel:
    model = PeftModel(serve_model(arch))
    for name, folder in folders.items():
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


def engine_for(folders: dict[str, Path], names: tuple[str, ...], **options: Any) -> Any:
    """An ``Engine`` over the tiny llama with the adapters ``names`` loaded from ``folders``."""
    from peftlab.serving import Engine

    chosen = {n: folders[n] for n in names}
    return Engine(loaded_model(chosen), tokenizer(), base_name=BASE, **options)


@contextmanager
def serving(engine: Any, **app_options: Any) -> Iterator[Client]:
    """``engine`` behind a real HTTP server on loopback for the span of the block, and a client
    of it (holding the app's ``api_key``, if one is given)."""
    from peftlab.serving.api import ServerThread, create_app

    with ServerThread(create_app(engine, **app_options)) as running:
        yield Client(running.url, api_key=app_options.get("api_key"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(proc: subprocess.Popen[str], client: Client, timeout: float) -> None:
    """Wait for a ``peftlab serve`` process to answer ``/health``; fail with its output if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if client.request("GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)


def slowed(monkeypatch: pytest.MonkeyPatch, engine: Engine, seconds: float) -> None:
    """Every model call takes at least ``seconds``, so a request is reliably still running."""
    forward = engine.model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow)


@contextmanager
def serve_process(
    model_dir: Path, *options: str, timeout: float = 90
) -> Iterator[tuple[subprocess.Popen[str], Client, int]]:
    """``peftlab serve --model model_dir`` in its own process (offline, one thread, warnings only,
    its output in a pipe) with ``options``, once it answers ``/health``: (process, client, port).
    Killed at the end if still running."""
    port = free_port()
    cmd = [sys.executable, "-m", "peftlab", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--threads", "1", "--log-level", "warning", *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = Client(f"http://127.0.0.1:{port}")
        wait_until_serving(proc, client, timeout)
        yield proc, client, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def alone(
    model: PeftModel, adapter: str, ids: list[int], max_tokens: int, eos: int | None = EOS
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy ``generate`` of one prompt with one adapter set the ordinary way, no padding: the
    new tokens (up to eos) and the logits of every step."""
    x = torch.tensor([ids])
    kw: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": False, "eos_token_id": eos}
    kw |= {"pad_token_id": PAD, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        if adapter in (BASE, "__base__"):
            with model.disable_adapter():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    # a decoder-only model's sequences hold the prompt, an encoder-decoder's the start token
    start = 1 if getattr(model.config, "is_encoder_decoder", False) else x.shape[1]
    new = out.sequences[0, start:].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return new, [step[0] for step in out.logits]


class Recorder:
    """Every row's next-token logits, call by call (a running batch's observer)."""

    def __init__(self) -> None:
        self.logits: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.batches: list[list[str]] = []

    def __call__(self, rows: Sequence[Row], logits: torch.Tensor) -> None:
        self.batches.append([r.adapter for r in rows])
        for row, line in zip(rows, logits, strict=True):
            self.logits[id(row)].append(line.clone())


def make_row(loop: asyncio.AbstractEventLoop, adapter: str, prompt: list[int], params: SamplingParams) -> Row:
    job = Job(loop, stream=False, model=adapter)
    row = Row(adapter, prompt, params, job, 0)
    job.rows.append(row)
    return row


def scheduled(
    loop: asyncio.AbstractEventLoop, plan: Sequence[tuple[str, list[int], int, int]]
) -> tuple[list[Row], dict[int, list[Row]]]:
    """The rows of ``plan`` (adapter, prompt ids, max_tokens, step it joins at) and who joins when."""
    rows = [make_row(loop, a, p, SamplingParams(max_tokens=n)) for a, p, n, _ in plan]
    schedule: dict[int, list[Row]] = defaultdict(list)
    for row, (_, _, _, at) in zip(rows, plan, strict=True):
        schedule[at].append(row)
    return rows, dict(schedule)


def run(
    batch: RunningBatch, schedule: dict[int, list[Row]], check: Callable[[Any], None]
) -> list[dict[str, Any]]:
    """Step until every scheduled row is done; ``schedule[step]`` joins before that step and
    ``check(batch)`` looks at the batch after every step."""
    steps = []
    step = 0
    while step <= max(schedule) or batch.rows:
        before = list(batch.rows)
        report = batch.step(schedule.get(step, []))
        check(batch)
        steps.append({"running": before, "joined": schedule.get(step, []), "left": report.left})
        step += 1
        assert step < 200
    return steps


def check_alone(
    model: PeftModel, rows: list[Row], plan: Sequence[tuple[str, list[int], int, int]], recorder: Recorder
) -> None:
    """Each row's tokens are those of ``generate`` with its adapter alone and its logits of every
    step within 1e-5 of generate's."""
    for row, (adapter, prompt, n, _) in zip(rows, plan, strict=True):
        want_tokens, want_logits = alone(model, adapter, prompt, n)
        assert row.tokens == want_tokens, (adapter, prompt)
        got = recorder.logits[id(row)]
        assert len(got) == len(want_logits)
        for g, w in zip(got, want_logits, strict=True):
            torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=0)
        assert row.finish_reason in ("stop", "length")


def offline(model: PeftModel, adapter: str, prompt: str, max_tokens: int) -> str:
    """The text ``generate`` gives for one prompt with one adapter alone."""
    new, _ = alone(model, adapter, tokenizer()(prompt)["input_ids"], max_tokens)
    return str(tokenizer().decode(new, skip_special_tokens=True))


class Client:
    """HTTP over loopback with the standard library only."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.api_key = api_key

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key or self.api_key:
            sent["Authorization"] = f"Bearer {key or self.api_key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            text = resp.read().decode()
            head = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        kind = head.get("content-type", "")
        if kind.startswith("text/event-stream") or kind.startswith("text/plain"):
            return resp.status, head, text
        return resp.status, head, json.loads(text) if text else None

    def complete(self, model: str, prompt: str | list[str], **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request(
            "POST", "/v1/completions", {"model": model, "prompt": prompt, "temperature": 0, **kw}
        )
        return status, body

    def chat(self, model: str, messages: Any, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request(
            "POST", "/v1/chat/completions", {"model": model, "messages": messages, "temperature": 0, **kw}
        )
        return status, body


def concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
