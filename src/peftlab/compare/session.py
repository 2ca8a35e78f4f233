"""How one comparison trains, pauses, resumes, validates and tests a method's model.

Every method starts from the same frozen base (:mod:`peftlab.compare.inputs`) and trains on the
same training split for the same budget of examples, validating every ``eval_every`` examples
(early stopping and the search's pruner decide on those losses). How quality is measured
depends on the model and the data (see :mod:`peftlab.training.classify`): an encoder
(``--model minilm``) gets a classification head and is scored on its argmax; a causal LM or an
encoder-decoder (T5, BART: the prompt to the encoder, the completion as the decoder's targets)
on classification data is scored by label-word likelihood; on prompt/completion data it
generates greedily and is scored by exact match, token F1, ROUGE-L and BLEU. Every mode also
reports the held-out loss (and perplexity for language models).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.compare.inputs import ComparisonInputs
from peftlab.compare.measure import Contention, worst
from peftlab.compare.options import RunSizes
from peftlab.compare.scoring import GENERATION_METRICS, score
from peftlab.core.peft_model import PeftModel, get_peft_model
from peftlab.core.quantized import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    prepare_for_kbit_training,
)
from peftlab.data.metrics import classification_metrics, perplexity
from peftlab.devices import peak_memory
from peftlab.models import load_language_model
from peftlab.presets import MethodPreset
from peftlab.training.classify import ClassifierAsNextToken, classify, score_label_words
from peftlab.training.encoding import Encoded
from peftlab.training.evaluation import evaluate_loss, evaluate_task
from peftlab.training.loop import TrainConfig, TrainHistory, TrainLoop, rng_state
from peftlab.training.memory import MemoryPlan


@dataclass
class Validation:
    loss: float
    metric: float | None  # the task metric where it costs nothing extra (classification)


@dataclass
class TestOutput:
    """A model's held-out results: metrics, and what the bootstrap and paired tests resample."""

    metrics: dict[str, float]
    samples: list[dict[str, str]]
    predictions: list[Any]  # class indices (classification) or generated strings
    references: list[Any]
    groups: list[int] | None = None  # generation: rows with one prompt are one test item

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainOutcome:
    history: TrainHistory
    examples_seen: int
    best_examples: int | None = None
    validations: list[dict[str, float | None]] = field(default_factory=list)
    reason: str = "budget"  # "budget", "stopped" (on_validation said so) or "paused" (stop_at)
    still_improving: bool = False
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated over training (CUDA only)
    wall_s: float = 0.0  # training time so far, validations included
    # other work on the machine while it trained (peftlab.compare.measure.Contention), worst part
    machine: dict[str, Any] | None = None
    # a paused run goes on from here with Session.resume: its loop and the RNG it paused with
    loop: TrainLoop | None = field(default=None, repr=False)
    rng: dict[str, Any] | None = field(default=None, repr=False)


class EarlyStopping:
    """Stop when the validation loss has not improved for ``patience`` validations; keeps a copy
    of the trainable state of the best one, which :meth:`restore` puts back."""

    def __init__(self, model: nn.Module, patience: int, heartbeat: Callable[[], None] = lambda: None) -> None:
        self.model = model
        self.patience = patience
        self.heartbeat = heartbeat
        self.best_loss = float("inf")
        self.best_examples: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.losses: list[float] = []
        self.waited = 0

    def __call__(self, seen: int, result: Validation) -> bool:
        self.heartbeat()
        self.losses.append(result.loss)
        if result.loss < self.best_loss:
            self.best_loss, self.best_examples, self.waited = result.loss, seen, 0
            self.best_state = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self) -> None:
        if self.best_state is None:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value)
        self.best_state = None

    def still_improving(self, reason: str) -> bool:
        """Whether the budget ended a run whose validation loss was still falling clearly (by more
        than 1% over its last validation interval)."""
        if reason != "budget" or len(self.losses) < 2:
            return False
        return self.losses[-1] < 0.99 * self.losses[-2]


class SharedBase:
    """The one copy of each base a comparison trains on, and the adapted model now in place on it.

    A method's adapter goes into the loaded base (no copy of it is made); before another run
    takes the base, the adapter in place is set aside (:meth:`PeftModel.detach`: its modules and
    parameters kept, so a paused search trial can go on later), and :meth:`release` returns the
    base to exactly what was loaded. Full fine-tuning trains the base's weights loaded again from
    disk instead.
    """

    def __init__(self, inputs: ComparisonInputs, verbose: bool = False) -> None:
        self.inputs = inputs
        self.verbose = verbose
        self.quantized: dict[str, nn.Module] = {}
        self.attached: PeftModel | None = None
        # per base touched: its parameters' dtypes as loaded (k-bit preparation changes norms')
        self.loaded_dtypes: dict[int, tuple[nn.Module, dict[str, torch.dtype]]] = {}

    def base_for(self, preset: MethodPreset) -> nn.Module:
        base = self.inputs.base if preset.quantize is None else self.quantized_base(preset.quantize)
        if id(base) not in self.loaded_dtypes:
            self.loaded_dtypes[id(base)] = (base, {n: p.dtype for n, p in base.named_parameters()})
        return base

    def activate(self, peft: PeftModel | None) -> None:
        """Put ``peft``'s adapter in place on its base (None: no adapter in place)."""
        if peft is self.attached:
            return
        self.set_aside()
        if peft is not None:
            peft.attach()
            self.attached = peft

    def set_aside(self) -> None:
        if self.attached is not None:
            self.attached.detach()
            self.attached = None

    def release(self) -> None:
        """Every base as loaded: no adapter in place, parameters in their loaded dtypes, no hook
        that k-bit preparation added, no activation checkpointing."""
        self.set_aside()
        for base, dtypes in self.loaded_dtypes.values():
            with torch.no_grad():
                for name, param in base.named_parameters():
                    if param.dtype != dtypes[name]:
                        param.data = param.data.to(dtypes[name])
            disable = getattr(base, "disable_input_require_grads", None)
            if callable(disable) and getattr(base, "_require_grads_hook", None) is not None:
                disable()
            disable_activation_checkpointing(base)  # a memory plan's, for the method before

    def quantized_base(self, scheme: str) -> nn.Module:
        """The base loaded again, quantized (``qlora``), once per comparison."""
        found = self.quantized.get(scheme)
        if found is None:
            if self.inputs.model_kind == "encoder":
                raise ValueError(f"a base quantized to {scheme} is for causal LMs; drop qlora from --methods")
            found, _ = load_language_model(
                self.inputs.model,
                kind=self.inputs.model_kind,
                gguf_file=self.inputs.gguf_file,
                dtype=self.inputs.precision.dtype,
                device=self.inputs.precision.device,
                verbose=self.verbose,
                quantization=scheme,
            )
            for p in found.parameters():
                p.requires_grad_(False)
            self.quantized[scheme] = found
        return found


class Session:
    """How the methods of one comparison train on its inputs (see the module docstring), on all
    the training rows or, for a point of a data-size curve, on the first ``train_rows`` of them
    (each smaller set inside the larger: the split's order is a salted hash order, interleaved
    by label, so every prefix keeps the label proportions)."""

    def __init__(
        self,
        inputs: ComparisonInputs,
        *,
        verbose: bool = False,
        train_rows: int | None = None,
        bases: SharedBase | None = None,
    ) -> None:
        self.inputs = inputs
        self.verbose = verbose
        self.train_rows = train_rows
        self.sizes: RunSizes = inputs.sizes if train_rows is None else inputs.sizes.for_train_size(train_rows)
        self.bases = SharedBase(inputs, verbose) if bases is None else bases
        # the memory plan runs train with (None: the whole batch at once, no checkpointing)
        self.plan: MemoryPlan | None = None

    def at_size(self, train_rows: int | None) -> Session:
        """The same comparison trained on the first ``train_rows`` training rows (None: all)."""
        return Session(self.inputs, verbose=self.verbose, train_rows=train_rows, bases=self.bases)

    @property
    def train_encoded(self) -> list[Encoded]:
        return self.inputs.train_split.encoded[: self.train_rows]

    @property
    def model_kind(self) -> str:
        return self.inputs.model_kind

    # ---- models ----------------------------------------------------------------------------
    def prepare(self, preset: MethodPreset, seed: int) -> tuple[nn.Module, PeftModel | None]:
        """A model for one run of ``preset``, initialised from ``seed``: the preset's adapter in
        the shared base (whatever adapter was in place set aside), or for full fine-tuning every
        weight of the base loaded again from disk; what trains is fp32 (:class:`Precision`)."""
        precision = self.inputs.precision
        checkpointing = self.plan is not None and self.plan.checkpointing
        self.bases.set_aside()
        if preset.method is None:
            model = self.inputs.load_base_again(verbose=self.verbose)
            for p in model.parameters():
                p.requires_grad_(True)
            if checkpointing:
                enable_activation_checkpointing(model)
            return precision.prepare(model), None
        base = self.bases.base_for(preset)
        if checkpointing:
            enable_activation_checkpointing(base)  # off again in SharedBase.release
        config = preset.config(base.config, self.inputs.task_type)
        assert config is not None  # only full fine-tuning has none
        torch.manual_seed(seed)
        peft = get_peft_model(base, config)
        self.bases.activate(peft)
        precision.prepare(peft)
        if preset.quantize is not None:
            prepare_for_kbit_training(peft, gradient_checkpointing=False)
        return peft, peft

    def activate(self, peft: PeftModel | None) -> None:
        """Put a paused run's adapter back in place (a search trial its final run goes on from)."""
        self.bases.activate(peft)

    def release(self) -> None:
        """The shared base as loaded again (see :class:`SharedBase`)."""
        self.bases.release()

    def train(
        self,
        model: nn.Module,
        learning_rate: float,
        seed: int,
        *,
        budget: int,
        on_validation: Callable[[int, Validation], bool],
        desc: str,
        stop_at: int | None = None,
    ) -> TrainOutcome:
        """Train on the schedule of ``budget`` examples, validating every ``eval_every`` examples;
        training stops early when ``on_validation(examples seen, result)`` returns True, and
        pauses after ``stop_at`` examples (reason "paused"), from where :meth:`resume` goes on
        exactly as an uninterrupted run would (a search trial is the start of its final run)."""
        sizes = self.sizes
        steps = max(1, budget // sizes.batch_size)
        config = TrainConfig(
            steps=steps,
            batch_size=sizes.batch_size,
            learning_rate=learning_rate,
            warmup_steps=min(steps // 10, 5),
            max_length=self.inputs.plan.max_length,
            seed=seed,
            micro_batch_size=self._micro_batch(),
        )
        forward = ClassifierAsNextToken(model) if self.inputs.run_kind == "encoder-classification" else None
        loop = TrainLoop(
            model,
            self.train_encoded,
            config,
            pad_token_id=self.inputs.pad,
            forward_module=forward,
            precision=self.inputs.precision,
        )
        outcome = TrainOutcome(loop.history, 0, loop=loop)
        return self._advance(outcome, model, on_validation, desc, stop_at)

    def _micro_batch(self) -> int | None:
        plan, batch = self.plan, self.sizes.batch_size
        if plan is None or plan.micro_batch >= batch:
            return None
        return plan.micro_batch

    def resume(
        self,
        outcome: TrainOutcome,
        model: nn.Module,
        *,
        on_validation: Callable[[int, Validation], bool],
        desc: str,
    ) -> TrainOutcome:
        """Go on with a run :meth:`train` paused, to the end of its budget (or an early stop)."""
        if outcome.reason != "paused" or outcome.loop is None:
            raise ValueError(f"only a paused run can be resumed (this one ended: {outcome.reason})")
        return self._advance(outcome, model, on_validation, desc, None)

    def _advance(
        self,
        outcome: TrainOutcome,
        model: nn.Module,
        on_validation: Callable[[int, Validation], bool],
        desc: str,
        stop_at: int | None,
    ) -> TrainOutcome:
        loop = outcome.loop
        assert loop is not None
        batch = self.sizes.batch_size
        every = max(1, self.sizes.eval_every // batch)
        steps = loop.config.steps
        pause = steps if stop_at is None else min(steps, max(1, stop_at // batch))
        outcome.reason = "budget"

        def on_step(current: TrainLoop) -> None:
            if current.step % every == 0 or current.step == steps:
                seen = current.step * batch
                watch.sample()
                result = self.validate(model)
                outcome.validations.append({"examples": seen, "loss": result.loss, "metric": result.metric})
                if on_validation(seen, result):
                    current.stop_requested = True
                    outcome.reason = "stopped"
                    return
            if current.step >= pause and current.step < steps:
                current.stop_requested = True
                outcome.reason = "paused"
                outcome.rng = rng_state()  # inside the run's RNG: what it goes on with

        loop.stop_requested = False
        if outcome.rng is not None:
            loop.resume_rng, outcome.rng = outcome.rng, None
        started, watch = time.perf_counter(), Contention().start()
        with peak_memory(self.inputs.precision.device) as peak:
            loop.run(desc=desc, on_step=on_step, progress=False)
        outcome.wall_s += time.perf_counter() - started
        outcome.machine = worst(outcome.machine, watch.stop())
        outcome.peak_gpu_bytes = peak["peak_bytes"]
        outcome.examples_seen = loop.step * batch
        if outcome.reason != "paused":
            outcome.loop = None  # nothing goes on from here: let the optimizer state go
        return outcome

    @torch.no_grad()
    def validate(self, model: nn.Module) -> Validation:
        """Loss on the validation split (and the task metric where it comes with the loss)."""
        inputs = self.inputs
        labels, encoded = inputs.task.labels, inputs.val_split.encoded
        with inputs.precision.autocast():
            if inputs.run_kind == "encoder-classification":
                indices, loss = classify(model, encoded, inputs.pad)
            elif inputs.run_kind == "causal-classification":
                indices, loss = score_label_words(
                    model, inputs.tokenizer, encoded, labels, pad_token_id=inputs.pad
                )
            else:
                return Validation(evaluate_loss(model, encoded, pad_token_id=inputs.pad), None)
        references = [labels.index(str(ex.label)) for ex in inputs.val_split.examples]
        accuracy = float(np.mean(np.asarray(indices) == np.asarray(references)))
        return Validation(loss, accuracy if inputs.metric == "accuracy" else None)

    @torch.no_grad()
    def evaluate_test(self, model: nn.Module) -> TestOutput:
        """The model's held-out metrics and per-example outputs on the test split (in the
        comparison's precision)."""
        with self.inputs.precision.autocast():
            if self.inputs.run_kind == "generation":
                return self._test_generation(model)
            return self._test_classification(model)

    def _test_generation(self, model: nn.Module) -> TestOutput:
        inputs = self.inputs
        examples, encoded = inputs.test_split.examples, inputs.test_split.encoded
        result = evaluate_task(
            model,
            inputs.tokenizer,
            dataclasses.replace(inputs.task, eval=tuple(examples)),
            prompt_ids=[e.prompt_ids for e in encoded],
            max_new_tokens=inputs.plan.max_new_tokens,
            stop_ids=inputs.fmt.stop_ids(),
        )
        loss = evaluate_loss(model, encoded, pad_token_id=inputs.pad)
        triples = zip(result.prompts, result.predictions, result.references, strict=True)
        samples = [{"prompt": p, "prediction": q, "reference": r} for p, q, r in list(triples)[:3]]
        groups = inputs.test_groups
        output = TestOutput({}, samples, list(result.predictions), list(result.references), groups)
        # the task's own figures, with the text metrics over test items (all of an item's
        # references at once) as the headline and its interval count them
        grouped = {m: score(output.to_dict(), m, "generation", 0) for m in GENERATION_METRICS}
        output.metrics = {**result.metrics, **grouped, "eval_loss": loss, "perplexity": perplexity(loss)}
        return output

    def _test_classification(self, model: nn.Module) -> TestOutput:
        inputs = self.inputs
        labels = inputs.task.labels
        examples, encoded = inputs.test_split.examples, inputs.test_split.encoded
        if inputs.run_kind == "encoder-classification":
            indices, loss = classify(model, encoded, inputs.pad)
            shown = [ex.text or "" for ex in examples]
        else:
            indices, loss = score_label_words(
                model, inputs.tokenizer, encoded, labels, pad_token_id=inputs.pad
            )
            shown = [ex.prompt for ex in examples]
        references = [labels.index(str(ex.label)) for ex in examples]
        metrics = {
            **classification_metrics([labels[i] for i in indices], [labels[i] for i in references], labels),
            "eval_loss": loss,
        }
        if inputs.run_kind == "causal-classification":
            metrics["perplexity"] = perplexity(loss)
        samples = [
            {"prompt": s, "prediction": labels[p], "reference": labels[r]}
            for s, p, r in zip(shown[:3], indices, references, strict=False)
        ]
        return TestOutput(metrics, samples, list(indices), references)
