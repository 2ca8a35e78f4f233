"""The one train/eval loop every peftlab command shares, for causal language models and
encoder-decoders (whose rows, :class:`~peftlab.training.encoding.Encoded` with ``seq2seq``, give
the encoder its input and the decoder its targets).

Training minimises the next-token cross-entropy on completion tokens only (prompt and padding
labels are -100), with AdamW over the parameters that require grad (adapter parameters of a
:class:`~peftlab.PeftModel`, or everything for full fine-tuning) and a warmup + linear, cosine
or constant schedule. One optimizer step sees ``batch_size x grad_accum x world_size``
examples; its loss is the mean over *all* completion tokens of that global batch, so gradient
accumulation and data parallelism give the gradient of the same batch run at once.

The loss is computed by :func:`peftlab.training.lm_head.supervised_loss_sum`: the output head
and the cross-entropy run only at supervised positions, in chunks, so no ``batch x seq x vocab``
logits exist. A :class:`~peftlab.devices.Precision` runs the forward under autocast (bf16/fp16)
with what trains kept in fp32, and float16 with a gradient scaler.

All randomness comes from the config's seed: batch order from an explicit generator
(:class:`BatchStream`), dropout from a forked, seeded global RNG that is restored afterwards.
:class:`TrainLoop` exposes every piece of that state, so a run can be checkpointed and resumed
to the bit.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from peftlab.devices import Precision, device_of
from peftlab.training.encoding import BatchStream, Encoded, collate, num_targets
from peftlab.training.lm_head import supervised_loss_sum
from peftlab.training.saved_activations import recomputed_activations, unexpanded_kv_heads

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Optimisation settings. An optimizer step sees ``batch_size x grad_accum x world_size``
    examples; each process runs its ``batch_size`` examples ``grad_accum`` times in forward
    passes of at most ``micro_batch_size`` (None: all ``batch_size`` at once), which only
    changes the memory a step takes: the gradient is the same up to float rounding (a memory
    plan, :class:`peftlab.training.memory.MemoryPlan`, sets it)."""

    steps: int = 30
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 256
    seed: int = 0
    grad_accum: int = 1
    lr_schedule: str = "linear"
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ValueError(
                f"micro_batch_size must be in [1, batch_size={self.batch_size}], got {self.micro_batch_size}"
            )
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")

    @property
    def forward_size(self) -> int:
        """Examples per forward pass."""
        return self.batch_size if self.micro_batch_size is None else self.micro_batch_size


@dataclass
class TrainHistory:
    """Per-step loss, wall time, learning rate and number of (non-padding) tokens."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def total_time(self) -> float:
        return sum(self.step_times)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens) / self.total_time if self.total_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_time": self.total_time, "tokens_per_second": self.tokens_per_second}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainHistory:
        return cls(**{k: list(data[k]) for k in ("losses", "step_times", "learning_rates", "tokens")})


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) stopped being finite; the step was not applied."""

    def __init__(self, step: int, value: float, what: str = "loss") -> None:
        self.step = step
        self.value = value
        super().__init__(f"{what} became {value} at step {step}; lower the learning rate")


def lr_schedule(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier at step ``s`` (0-based): linear warmup ``(s+1)/(warmup+1)``, then
    ``linear`` 1 -> 0, ``cosine`` 1 -> 0 along a half cosine, or ``constant`` 1."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout for the block without leaving the global RNG changed afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def rng_state() -> dict[str, Any]:
    """The process's global RNG states: torch (CPU and every initialised CUDA device), Python's
    ``random`` and numpy's legacy global generator."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["cuda"]):
            raise ValueError(
                f"the saved RNG state covers {len(state['cuda'])} CUDA devices, which this machine lacks"
            )
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- training -------------------------------------------------------------------------


StepHook = Callable[["TrainLoop"], None]


def _fused_ok(params: list[nn.Parameter]) -> bool | None:
    """Whether AdamW's fused kernel applies (float parameters on a CPU or CUDA device): on a CPU
    it is ~4x faster than the default per-tensor loop (full fine-tuning of SmolLM2-135M: 0.27 s
    instead of 1.1 s per update), the same update up to float rounding."""
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


class TrainLoop:
    """AdamW training of ``model``'s trainable parameters, one optimizer step at a time.

    ``forward_module`` is what the forward pass calls (a ``DistributedDataParallel`` wrapper of
    ``model`` under torch.distributed; ``model`` itself otherwise). Each process takes its
    share of every global batch: micro-batch ``m`` of rank ``r`` is chunk ``m * world_size + r``
    of the step's indices, so micro-batch ``m`` of a single process with ``world_size`` times
    the batch size covers the same examples. :meth:`state_dict` / :meth:`load_state_dict`
    hold everything but the parameters and the RNG, which :attr:`resume_rng` restores.

    ``precision`` (default: float32 on the model's device) runs each forward under its
    autocast; with a mixed precision the trainable parameters are cast to float32 here, so they
    and AdamW's state are fp32 whatever dtype the frozen weights have (move the frozen weights
    with :meth:`Precision.prepare`). float16 steps go through a ``GradScaler``: a step whose
    scaled gradients overflow is skipped and the scale lowered, as the scaler does.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Sequence[Encoded],
        config: TrainConfig,
        *,
        pad_token_id: int,
        forward_module: nn.Module | None = None,
        rank: int = 0,
        world_size: int = 1,
        precision: Precision | None = None,
    ) -> None:
        if not data:
            raise ValueError("no training examples")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                "the model has no trainable parameters: attach an adapter (get_peft_model) or call "
                "model.train_adapter(name), or unfreeze parameters for full fine-tuning"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.model = model
        self.forward_module = forward_module if forward_module is not None else model
        self.precision = precision if precision is not None else Precision(device_of(model))
        if self.precision.mixed:
            with torch.no_grad():
                for p in self.params:
                    if p.is_floating_point() and p.dtype != torch.float32:
                        p.data = p.data.float()
        self.scaler = self.precision.grad_scaler()
        self.data = data
        self.config = config
        self.pad_token_id = pad_token_id
        self.rank = rank
        self.world_size = world_size
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            fused=_fused_ok(self.params),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(config.lr_schedule, config.warmup_steps, config.steps)
        )
        self.batches = BatchStream(len(data), config.seed)
        self.history = TrainHistory()
        self.step = 0  # optimizer steps done
        self.skipped_steps = 0  # float16 steps the gradient scaler skipped (overflow)
        self.resume_rng: dict[str, Any] | None = None  # applied instead of seeding when run() starts
        self.stop_requested = False  # set by an on_step hook (early stopping) to end run() there
        self._targets = [num_targets(ex) for ex in data]

    @property
    def global_batch_size(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.world_size

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "history": asdict(self.history),
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
            state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        self.history = TrainHistory.from_dict(state["history"])
        self.step = int(state["step"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
            self.skipped_steps = int(state.get("skipped_steps", 0))

    def run(
        self, *, progress: bool = True, desc: str = "train", on_step: StepHook | None = None
    ) -> TrainHistory:
        """Train until ``config.steps`` optimizer steps are done (or an ``on_step`` hook sets
        ``stop_requested``), calling ``on_step(self)`` after each (inside the training RNG, so
        :func:`rng_state` there is the run's)."""
        device = device_of(self.model)
        was_training = self.model.training
        self.forward_module.train()
        self.model.train()
        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            desc=desc,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            # every process seeds its own dropout stream
            with _seeded_rng(self.config.seed + self.rank, device):
                if self.resume_rng is not None:
                    set_rng_state(self.resume_rng)
                    self.resume_rng = None
                while self.step < self.config.steps and not self.stop_requested:
                    self._step(device)
                    elapsed = self.history.step_times[-1]
                    bar.set_postfix(
                        loss=f"{self.history.losses[-1]:.3f}",
                        tok_s=f"{self.history.tokens[-1] / elapsed:.0f}" if elapsed > 0 else "-",
                        refresh=False,
                    )
                    bar.update(1)
                    if on_step is not None:
                        on_step(self)
        finally:
            bar.close()
            self.model.train(was_training)
        return self.history

    def _step(self, device: torch.device) -> None:
        """One optimizer step over the next global batch: gradients accumulated over its
        micro-batches, clipped, applied, and the step recorded in the history."""
        indices = self.batches.take(self.global_batch_size)
        n_targets = sum(self._targets[i] for i in indices)
        if n_targets == 0:
            raise ValueError("batch has no completion tokens to learn from (all labels are -100)")
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._accumulate(indices, n_targets, device)
        step = self.step + 1
        if not math.isfinite(loss):
            raise TrainingDiverged(step, loss)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self._apply(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.step = step
        self.history.losses.append(loss)
        self.history.step_times.append(time.perf_counter() - start)
        self.history.learning_rates.append(lr)
        self.history.tokens.append(sum(self.data[i].num_tokens for i in indices))

    def _accumulate(self, indices: list[int], n_targets: int, device: torch.device) -> float:
        """Backward through this process's micro-batches of the global batch ``indices``; returns
        the batch's mean loss per supervised token (over every process)."""
        cfg = self.config
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        # DDP averages gradients over processes; scaling by world_size makes that the sum over
        # the global batch, which the 1 / n_targets turns into its token mean
        scale = self.world_size / n_targets
        size = cfg.forward_size
        pieces = []
        for micro in range(cfg.grad_accum):
            first = (micro * self.world_size + self.rank) * cfg.batch_size
            chunk = indices[first : first + cfg.batch_size]
            # a memory plan's micro-batches: the chunk in forward passes of at most `size`
            pieces += [chunk[at : at + size] for at in range(0, len(chunk), size)]
        for number, piece in enumerate(pieces):
            batch = {
                k: v.to(device) for k, v in collate([self.data[i] for i in piece], self.pad_token_id).items()
            }
            labels = batch.pop("labels")
            last = number == len(pieces) - 1
            # under DDP, only the last micro-batch all-reduces the accumulated gradients
            skip_sync = not last and isinstance(self.forward_module, DistributedDataParallel)
            # unexpanded key/value heads through the backward pass too: activation checkpointing
            # runs the forward pass again there, and it must save what it saved the first time
            sync = self.forward_module.no_sync() if skip_sync else contextlib.nullcontext()  # type: ignore[operator]
            with sync, unexpanded_kv_heads(self.model):
                with self.precision.autocast(), recomputed_activations(self.model):
                    summed = supervised_loss_sum(self.forward_module, self.model, batch, labels)
                scaled = summed * scale
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += summed.detach().float()
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
        return float(loss_sum) / n_targets

    def _apply(self, step: int) -> None:
        """Clip the gradients and take the optimizer and scheduler step (through the gradient
        scaler in float16, which skips a step whose gradients overflowed)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
            # with a gradient scaler an overflow is expected now and then: the scaler skips the step
            if not math.isfinite(norm) and self.scaler is None:
                raise TrainingDiverged(step, norm, "gradient norm")
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < before:
                self.skipped_steps += 1
        else:
            self.optimizer.step()
        self.scheduler.step()


def train(
    model: nn.Module,
    data: Sequence[Encoded],
    config: TrainConfig,
    *,
    pad_token_id: int,
    progress: bool = True,
    desc: str = "train",
    precision: Precision | None = None,
) -> TrainHistory:
    """Train ``model`` in place for ``config.steps`` steps and return the history.

    Works with a :class:`~peftlab.PeftModel` (only adapter parameters require grad) and with a
    plain model (full fine-tuning): whatever requires grad is optimised, nothing else is touched.
    """
    loop = TrainLoop(model, data, config, pad_token_id=pad_token_id, precision=precision)
    return loop.run(progress=progress, desc=desc)
