"""``peftlab train`` as a library call: one method on one causal LM or encoder-decoder (T5,
BART: :func:`peftlab.models.model_kind`) and one data set, with progress, evaluation, atomic
checkpoints, exact resume and data parallelism.

:func:`run_training` runs a :class:`~peftlab.training.settings.RunConfig`. Under ``torchrun`` /
``accelerate launch`` each process trains on its share of every global batch through
``DistributedDataParallel`` and only rank 0 writes files or shows progress. A checkpoint (see
:mod:`peftlab.training.checkpoints`) holds the trainable parameters, optimizer, scheduler, data
position and every process's RNG state, so a resumed run continues bit for bit. The data are
prepared as every command prepares them (:mod:`peftlab.training.preparation`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab import allocator
from peftlab.core import atomic
from peftlab.core.peft_model import PeftModel, count_parameters, get_peft_model
from peftlab.core.quantized import BITS_PER_PARAM, enable_activation_checkpointing, prepare_for_kbit_training
from peftlab.data.tasks import Task
from peftlab.devices import Precision, peak_memory, resolve_dtype
from peftlab.models import load_language_model, load_tokenizer, model_kind, quiet
from peftlab.presets import PRESETS
from peftlab.training import distributed
from peftlab.training.checkpoints import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_run_checkpoint,
    save_checkpoint,
    step_folders,
    trainable_parameters,
    write_run_checkpoint,
)
from peftlab.training.encoding import pad_id
from peftlab.training.evaluation import evaluate_held_out
from peftlab.training.fitting import PromptFormat
from peftlab.training.loop import TrainConfig, TrainHistory, TrainingDiverged, TrainLoop, rng_state
from peftlab.training.memory import (
    GIB,
    MemoryPlan,
    MemoryPlanner,
    available_bytes,
    cap_device_memory,
    free_device_memory,
    gib,
    is_out_of_memory,
    training_estimate,
    weight_bytes,
)
from peftlab.training.preparation import PreparedData, RowEncoder, load_task, prepare_data
from peftlab.training.settings import DEFAULT_EVAL_FRACTION, RunConfig, uses_checkpointing
from peftlab.training.tracking import Tracker, make_tracker


@dataclass
class RunResult:
    model: nn.Module
    tokenizer: Any
    metrics: dict[str, Any]
    out: Path


def load_run_task(config: RunConfig) -> Task:
    fraction = DEFAULT_EVAL_FRACTION if config.eval_fraction is None else config.eval_fraction
    return load_task(
        task=config.task,
        data=config.data,
        eval_data=config.eval_data,
        eval_fraction=fraction,
        seed=config.seed,
    )


def total_steps(config: RunConfig, num_train: int, global_batch: int) -> int:
    if config.steps is not None:
        return config.steps
    epochs = 1.0 if config.epochs is None else float(config.epochs)
    return max(1, math.ceil(epochs * num_train / global_batch))


def quantized_load(scheme: str | None, double_quant: bool, device: Any) -> dict[str, Any]:
    """The loader's arguments for a quantized base (loaded straight onto its device), or none."""
    if scheme is None:
        return {}
    return {"quantization": scheme, "double_quant": double_quant, "device": device}


def build_model(config: RunConfig, base: nn.Module) -> nn.Module:
    """``base`` with the run's adapter (seeded) or, for full fine-tuning, every weight trainable;
    activation checkpointing on where the settings ask for it."""
    supported = getattr(base, "supports_gradient_checkpointing", False)
    if uses_checkpointing(config) and (supported or config.gradient_checkpointing):
        if not supported:
            raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; drop the flag")
        # non-reentrant: works with frozen inputs (adapters) and under DDP
        enable_activation_checkpointing(base)
        _no_cache(base)
    peft_config = config.peft_config(getattr(base, "config", None))
    if peft_config is None:
        base.requires_grad_(True)
        return base
    # adapter initialisation draws from torch's global RNG: seed it, and leave it as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_peft_model(base, peft_config)


def _no_cache(model: nn.Module) -> None:
    """No key/value cache in training forwards (checkpointing recomputes them)."""
    model_config = getattr(model, "config", None)
    if model_config is not None:
        model_config.use_cache = False


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_training(
    config: RunConfig, *, resume: bool = False, verbose: bool = False, command: str = ""
) -> RunResult:
    """Train as ``config`` says and write the adapter (or full model) and metrics to ``config.out``."""
    info = distributed.setup(config.device)
    try:
        if config.plans_memory and info.world_size > 1:
            raise ValueError(
                "--auto-batch/--max-memory plan one process's memory; under torchrun set --batch-size "
                "and --grad-accum yourself (an out-of-memory error on one process stops them all)"
            )
        # a dtype the device cannot run is refused here, before any weights are loaded
        precision = Precision(info.device, resolve_dtype(config.dtype, info.device))
        if config.max_memory is not None:
            cap_device_memory(info.device, int(config.max_memory * GIB))
        # the default learning rate is written out, so a checkpoint does not depend on the preset
        config = dataclasses.replace(config, lr=config.learning_rate)
        plan: MemoryPlan | None = None
        while True:
            run = TrainingRun(config, info, precision=precision, verbose=verbose, plan=plan)
            try:
                return run.execute(resume=resume, command=command)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                if run.memory_plan is None or run.planner is None:
                    raise RuntimeError(
                        f"ran out of memory training {config.method} at batch {config.batch_size} on "
                        f"{info.device}; rerun with --auto-batch (micro-batches with gradient accumulation, "
                        "then activation checkpointing, to fit), or a smaller --batch-size or --max-length"
                        + ("; --resume goes on from the last checkpoint" if step_folders(run.root) else "")
                    ) from None
            # the failed attempt is let go first (its frames held the model)
            plan = run.planner.after_out_of_memory(run.memory_plan)
            del run
            free_device_memory(info.device)
            if not plan.fits:
                raise RuntimeError(f"{config.method} {plan.refusal()}; use a smaller --max-length or model")
            tqdm.write(
                f"out of memory: going on with micro-batch x accumulation {plan.describe()}"
                " from the last checkpoint (if any)"
            )
            resume = True
    finally:
        distributed.teardown(info)


class TrainingRun:
    """One ``peftlab train`` run, step by step: output folder, model and data, the loop (resumed
    from a checkpoint when asked), periodic evaluation and checkpoints, the final files."""

    def __init__(
        self,
        config: RunConfig,
        info: distributed.Dist,
        *,
        precision: Precision,
        verbose: bool,
        plan: MemoryPlan | None = None,
    ) -> None:
        self.config = config
        # the memory plan (--auto-batch): given after an out-of-memory error, else made from the
        # estimate once the model and the lengths are known
        self.memory_plan = plan
        self.planner: MemoryPlanner | None = None
        self.info = info
        self.precision = precision
        self.tracker: Tracker = Tracker()
        self.peak_bytes: int | None = None  # torch.cuda.max_memory_allocated over training
        self.verbose = verbose
        self.out = Path(config.out)
        self.root = self.out / CHECKPOINT_DIR
        self.evals: list[dict[str, Any]] = []

    def say(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message)

    def execute(self, *, resume: bool, command: str) -> RunResult:
        checkpoint = self._checkpoint_to_resume(resume)
        self.kind = model_kind(self.config.model, self.config.gguf_file)
        if self.kind == "encoder":
            raise ValueError(
                f"--model {self.config.model}: an encoder-only model cannot generate the completions "
                "peftlab train learns; give a causal LM or an encoder-decoder (T5, BART), or run "
                "peftlab compare on text/label data to train its classification head"
            )
        if not PRESETS[self.config.method].applies_to(self.kind):
            raise ValueError(
                f"--method {self.config.method} is for {' and '.join(PRESETS[self.config.method].kinds)} "
                f"models, and {self.config.model or 'the default model'} is a {self.kind} model; pick "
                "another --method (prefix puts a prefix on this model's attention)"
            )
        self.task = load_run_task(self.config)
        wall = time.perf_counter()
        # a chat template asked for and missing is refused before the weights load
        PromptFormat.resolve(
            load_tokenizer(self.config.model, gguf_file=self.config.gguf_file, verbose=self.verbose),
            self.config.chat_template,
            chat_rows=self.task.info.get("kind") == "chat",
            seq2seq=self.kind == "seq2seq",
        )
        with quiet(self.verbose):
            self._load()
            self._prepare_data()
            self._plan_memory()
            loop = self._make_loop(checkpoint)
            self._banner(loop, resume, checkpoint)
            if self.info.is_main:
                self.tracker = make_tracker(
                    self.config.report_to, self.out, run_name=self.out.name or "peftlab-train"
                )
            try:
                self.tracker.log_config({**self.config.to_dict(), "precision": self.precision.to_dict()})
                with peak_memory(self.info.device) as peak:
                    history = self._train(loop)
                self.peak_bytes = peak["peak_bytes"]
                final = self._final_eval()
                metrics = self._metrics(loop, history, final, command, time.perf_counter() - wall)
                if self.info.is_main:
                    self._write_outputs(history, final, metrics)
            finally:
                self.tracker.close()
            distributed.barrier(self.info)
        return RunResult(self.model, self.tokenizer, metrics, self.out)

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; give a folder")
        # every process decides from the same files before any of them writes
        if not resume and (step_folders(self.root) or (self.out / "run_config.json").is_file()):
            raise ValueError(
                f"{self.out} already holds a training run; pass --resume to continue it, or choose "
                "another --out"
            )
        return latest_checkpoint(self.root) if resume else None

    def _load(self) -> None:
        config, info = self.config, self.info
        # rank 0 loads first: the embedded model is converted into a shared cache on first use
        if not info.is_main:
            distributed.barrier(info)
        # full fine-tuning keeps fp32 master weights; adapters train over a base in --dtype
        base, self.tokenizer = load_language_model(
            config.model,
            kind=self.kind,
            gguf_file=config.gguf_file,
            dtype=self.precision.load_dtype(trains_everything=config.peft_config() is None),
            verbose=self.verbose,
            **quantized_load(config.quantize, config.double_quant, self.precision.device),
        )
        if info.is_main:
            distributed.barrier(info)
        self.model = self.precision.prepare(build_model(config, base))
        if config.quantize is not None:
            # after prepare, which casts frozen weights to --dtype: norms back to fp32, input grads
            prepare_for_kbit_training(self.model, gradient_checkpointing=False)

    def _prepare_data(self) -> None:
        config, task = self.config, self.task
        self.fmt = PromptFormat.resolve(
            self.tokenizer,
            config.chat_template,
            chat_rows=task.info.get("kind") == "chat",
            seq2seq=self.kind == "seq2seq",
        )
        self.data: PreparedData = prepare_data(
            task,
            self.model,
            RowEncoder(self.tokenizer, self.fmt),
            {"train": task.train, "eval": task.eval},
            held_out="eval",
            requested_length=config.max_length,
            batch_size=config.batch_size,
            param_bytes=self.precision.dtype.itemsize,
        )
        self.plan = self.data.plan
        # the chosen length is written into the run's settings, so a resumed run checks it
        self.config = config = dataclasses.replace(config, max_length=self.plan.max_length)
        self.train_split, self.eval_split = self.data.splits["train"], self.data.splits["eval"]
        self.fingerprint = self.data.fingerprint("train")
        self.global_batch = config.batch_size * config.grad_accum * self.info.world_size
        self.steps = total_steps(config, len(self.train_split.encoded), self.global_batch)

    def _make_loop(self, checkpoint: Path | None) -> TrainLoop:
        config, info = self.config, self.info
        train_config = TrainConfig(
            steps=self.steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            max_length=self.plan.max_length,
            seed=config.seed,
            grad_accum=config.grad_accum,
            lr_schedule=config.lr_schedule,
            micro_batch_size=self._micro_batch(),
        )
        saved: tuple[dict[str, Any], dict[str, Any]] | None = None
        if checkpoint is not None:
            saved = load_run_checkpoint(checkpoint, self.model, config, info.world_size, self.fingerprint)
        loop = TrainLoop(
            self.model,
            self.train_split.encoded,
            train_config,
            pad_token_id=pad_id(self.tokenizer),
            forward_module=self._forward_module(),
            rank=info.rank,
            world_size=info.world_size,
            precision=self.precision,
        )
        if saved is not None:
            trainer_state, optimizer_state = saved
            loop.load_state_dict({**trainer_state, "optimizer": optimizer_state})
            loop.resume_rng = trainer_state["rng"][info.rank]
            self.evals = list(trainer_state["evals"])
        return loop

    def _plan_memory(self) -> None:
        """With ``--auto-batch`` / ``--max-memory``: the micro-batch (and checkpointing) whose
        estimate fits (:class:`MemoryPlanner`), refused before training when nothing does."""
        config = self.config
        if not config.plans_memory:
            return
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        trainable, total = count_parameters(self.model)
        bits = BITS_PER_PARAM[(config.quantize, config.double_quant)] if config.quantize else None
        length, mixed = self.plan.max_length, self.precision.mixed

        def estimate(micro_batch: int, checkpointing: bool) -> int:
            return training_estimate(
                base,
                trainable,
                total,
                micro_batch,
                length,
                mixed=mixed,
                bits=bits,
                checkpointing=checkpointing,
            ).total

        if config.max_memory is not None:
            available: int | None = int(config.max_memory * GIB)
        else:
            free = available_bytes(self.info.device)
            # the weights loaded now are in the estimate too
            held = weight_bytes(self.model)
            available = None if free is None else free + held
        on_now = bool(getattr(base, "is_activation_checkpointing", False))
        allowed = (
            config.gradient_checkpointing is not False
            and PRESETS[config.method].supports_activation_checkpointing
            and bool(getattr(base, "supports_gradient_checkpointing", False))
        )
        self.planner = MemoryPlanner(
            estimate, config.batch_size, available, allowed, always_checkpoint=on_now
        )
        if self.memory_plan is None:
            self.memory_plan = self.planner.first()
        plan = self.memory_plan
        if not plan.fits:
            raise ValueError(
                f"{config.method} {plan.refusal()} (one example per forward pass"
                + (", activation checkpointing" if plan.checkpointing else "")
                + "); use a smaller --max-length or model"
                + (", or a larger --max-memory" if config.max_memory is not None else "")
            )
        if plan.checkpointing and not on_now:
            enable_activation_checkpointing(base)
            _no_cache(base)

    def _micro_batch(self) -> int | None:
        plan = self.memory_plan
        if plan is None or plan.micro_batch >= self.config.batch_size:
            return None
        return plan.micro_batch

    def _forward_module(self) -> nn.Module:
        """What the forward pass calls: the model, or under torch.distributed its DDP wrapper."""
        info = self.info
        if not info.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            self.model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,  # buffers (rotary tables) are the same everywhere and never trained
        )

    def _banner(self, loop: TrainLoop, resume: bool, checkpoint: Path | None) -> None:
        config = self.config
        self.trainable = sum(p.numel() for p in trainable_parameters(self.model).values())
        self.total = sum(p.numel() for p in self.model.parameters())
        self.say(
            f"peftlab train: {config.method} on {config.model or 'smollm2-135m'}, task {self.task.name!r} "
            f"({len(self.train_split.encoded)} train / {len(self.eval_split.encoded)} eval examples)\n"
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {100 * self.trainable / self.total:.4f}\n"
            f"{self.steps} steps of {self.global_batch} examples (batch {config.batch_size} x grad_accum "
            f"{config.grad_accum} x {self.info.world_size} processes), lr {config.learning_rate:g} "
            f"({config.lr_schedule}); {self.precision.describe()}\n"
            f"{self.fmt.describe()}; {self.plan.describe()}; {self.train_split.fit.describe()}; "
            f"{self.eval_split.fit.describe()}"
        )
        plan = self.memory_plan
        if plan is not None:
            available = "unknown" if plan.available_bytes is None else gib(plan.available_bytes)
            self.say(
                f"memory plan: micro-batch x accumulation {plan.describe()} per batch of "
                f"{config.batch_size}; estimate {gib(plan.needed_bytes)} of {available}"
            )
        if resume and checkpoint is None:
            self.say(f"--resume: no checkpoint in {self.root}; starting from step 0")
        elif checkpoint is not None:
            self.say(
                f"resuming from {checkpoint} (step {loop.step} of {self.steps}, "
                f"epoch {loop.batches.epoch:.2f})"
            )

    def _evaluate_now(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.info.is_main:
            n = min(self.config.num_eval, len(self.eval_split.examples))
            metrics = evaluate_held_out(
                self.model,
                self.tokenizer,
                self.task,
                self.eval_split.examples[:n],
                self.eval_split.encoded[:n],
                max_new_tokens=self.plan.max_new_tokens,
                stop_ids=self.fmt.stop_ids(),
                precision=self.precision,
            )
            self.evals.append({"step": step, **metrics})
            self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        distributed.barrier(self.info)
        return metrics

    def _on_step(self, loop: TrainLoop) -> None:
        config, step = self.config, loop.step
        history = loop.history
        seconds = history.step_times[-1]
        self.tracker.log(
            {
                "train/loss": history.losses[-1],
                "train/learning_rate": history.learning_rates[-1],
                "train/tokens_per_second": history.tokens[-1] / seconds if seconds > 0 else 0.0,
            },
            step,
        )
        if config.eval_every and step % config.eval_every == 0 and step < self.steps and config.num_eval:
            metrics = self._evaluate_now(step)
            self.say(f"step {step}: {_fmt(metrics)}")
        if config.save_every and step % config.save_every == 0:
            self._save_checkpoint(loop)

    def _save_checkpoint(self, loop: TrainLoop) -> None:
        rng = distributed.gather_to_main(self.info, rng_state())
        if self.info.is_main:
            save_checkpoint(
                self.root,
                loop.step,
                lambda folder: write_run_checkpoint(
                    folder,
                    model=self.model,
                    loop=loop,
                    config=self.config,
                    rng=rng,
                    evals=self.evals,
                    fingerprint=self.fingerprint,
                ),
                self.config.keep_checkpoints,
            )
        distributed.barrier(self.info)

    def _train(self, loop: TrainLoop) -> TrainHistory:
        try:
            return loop.run(
                progress=self.info.is_main, desc=f"train {self.config.method}", on_step=self._on_step
            )
        except TrainingDiverged as err:
            last = latest_checkpoint(self.root)
            kept = (
                f"the last good checkpoint is {last}"
                if last
                else "no checkpoint was written yet (--save-every)"
            )
            raise RuntimeError(
                f"{err} (--lr is {self.config.learning_rate:g}); training stopped and {kept}"
            ) from None

    def _final_eval(self) -> dict[str, float]:
        return self._evaluate_now(self.steps) if self.config.num_eval else {}

    def _metrics(
        self, loop: TrainLoop, history: TrainHistory, final: dict[str, float], command: str, wall: float
    ) -> dict[str, Any]:
        task = self.task
        return {
            "command": command,
            "config": self.config.to_dict(),
            "model_kind": self.kind,
            "task": {"name": task.name, "description": task.description, "metric": task.metric},
            "steps": self.steps,
            "precision": self.precision.to_dict(),
            "chat_template": self.fmt.source if self.fmt.chat else None,
            "peak_gpu_memory_bytes": self.peak_bytes,
            "memory_plan": self.memory_plan.to_dict() if self.memory_plan is not None else None,
            "allocator": allocator.loaded() or "system",
            "world_size": self.info.world_size,
            "global_batch_size": self.global_batch,
            "epochs": loop.batches.epoch,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "lengths": self.plan.to_dict(),
            "rows": self.data.rows(),
            "history": history.to_dict(),
            "evals": self.evals,
            "final_eval": final,
            "wall_seconds": wall,
        }

    def _write_outputs(self, history: TrainHistory, final: dict[str, float], metrics: dict[str, Any]) -> None:
        out, model = self.out, self.model
        out.mkdir(parents=True, exist_ok=True)
        # an adapter in PEFT's format, or (full) transformers' config.json + model.safetensors
        model.save_pretrained(out)  # type: ignore[operator]
        if not isinstance(model, PeftModel):
            self.tokenizer.save_pretrained(out)
        atomic.write_json(out / "run_config.json", self.config.to_dict())
        atomic.write_json(out / "metrics.json", metrics)
        what = "adapter (PEFT format)" if isinstance(model, PeftModel) else "model (safetensors)"
        self.say(
            f"loss {history.losses[0]:.4f} -> {history.losses[-1]:.4f}, "
            f"{history.tokens_per_second:.0f} tokens/s"
            + (f"; final eval: {_fmt(final)}" if final else "")
            + f"\nsaved the {what} to {out}"
        )
