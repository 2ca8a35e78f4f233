"""transformers' ``Trainer`` for peftlab models: checkpoints that hold only the adapters.

``Trainer`` recognises adapter models by ``isinstance`` against HF PEFT's classes, so for any
other model it saves (and on resume expects) the full ``model.safetensors``, and it reads the
dataset columns and label names off the outer model's ``forward`` signature. A peftlab
``PeftModel`` is neither, so :class:`AdapterTrainer` (the name AdapterHub uses for the same
job) fills exactly those seams:

- ``checkpoint-N/`` and ``save_model()`` hold ``adapter_config.json`` +
  ``adapter_model.safetensors`` in PEFT's layout (other adapters in sub-folders), never the
  base weights;
- ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` copy the saved weights
  into the existing adapter parameters in place, so the optimizer state restored next still
  refers to them;
- dataset columns, label names and causal-LM label smoothing follow the wrapped model.

Everything else (optimizer over the trainable parameters only, schedules, gradient
accumulation, DDP, evaluation, callbacks) is Trainer's own.

    from peftlab import LoraConfig, get_peft_model
    from peftlab.integrations.trainer import AdapterTrainer

    model = get_peft_model(base, LoraConfig(r=8, task_type="CAUSAL_LM"))
    AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=ds).train()
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from peftlab.core.checkpoint import load_adapter_weights
from peftlab.core.peft_model import PeftModel

__all__ = ["AdapterTrainer"]


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` for a peftlab :class:`~peftlab.PeftModel`; takes exactly
    Trainer's arguments. See the module docstring for what differs."""

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, PeftModel):
            got = "no model (model_init is not supported)" if model is None else type(model).__name__
            raise ValueError(
                f"AdapterTrainer trains a peftlab PeftModel, got {got}; wrap the model with "
                "get_peft_model(base, config) first, or use transformers.Trainer for a plain model"
            )
        super().__init__(model, *args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # both hand _save a gathered full state dict instead of the live parameters
            raise ValueError(
                "AdapterTrainer does not support Trainer's FSDP / DeepSpeed settings yet; for FSDP use "
                "peftlab.integrations.fsdp.apply_fsdp2(model) in your own loop, or train with DDP (torchrun)"
            )
        # Trainer reads these off type(model).forward, which for PeftModel is (*args, **kwargs)
        base_cls = type(model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)
        # Trainer shifts labels for label smoothing only when it recognises a causal LM by name
        if (
            self.label_smoother is not None
            and self.compute_loss_func is None
            and base_cls.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        ):
            self.compute_loss_func = functools.partial(self.label_smoother, shift_labels=True)

    def _peft_model(self, model: nn.Module | None = None) -> PeftModel:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(unwrapped, PeftModel):
            raise TypeError(f"AdapterTrainer: the model is a {type(unwrapped).__name__}, not a PeftModel")
        return unwrapped

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self._peft_model().get_base_model().forward).parameters
            columns = list(dict.fromkeys([*params, "label", "label_ids", *self.label_names]))
            self._signature_columns = columns  # type: ignore[assignment]

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapters (PEFT layout), the tokenizer/processor and the training arguments."""
        if not self.args.should_save:
            return
        folder = output_dir if output_dir is not None else self.args.output_dir
        if folder is None:
            raise ValueError("AdapterTrainer: no output_dir to save the adapter to")
        os.makedirs(folder, exist_ok=True)
        self._peft_model().save_pretrained(folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapter_weights(self._peft_model(model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:
            raise ValueError("load_best_model_at_end: no best checkpoint was recorded")
        load_adapter_weights(self._peft_model(), best)
