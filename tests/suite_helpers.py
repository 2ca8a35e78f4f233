"""Helpers shared by the framework, LoRA and IA3 suites: the method table, comparisons and
HF PEFT as the numeric reference (a PEFT twin of a peftlab model with the same weights)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import peft
import torch
from torch import nn

from conftest import ARCHS, build_model
from peftlab import IA3Config, LoraConfig, PeftConfig, PeftModel, TaskType
from peftlab.core.layers import AdaptedModule, ModulesToSave

ATOL = 1e-5

TASKS: dict[str, TaskType] = {
    "llama": TaskType.CAUSAL_LM,
    "gpt2": TaskType.CAUSAL_LM,
    "bert": TaskType.SEQ_CLS,  # the classifier head is trained in full (modules_to_save)
    "t5": TaskType.SEQ_2_SEQ_LM,
    "bart": TaskType.SEQ_2_SEQ_LM,
}


def lora_config(arch: str, init: bool | str = True, **kw: Any) -> LoraConfig:
    """LoRA on every linear layer, so Conv1D, attention and FFN layers are all covered."""
    args: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    args.update(kw)
    return LoraConfig(init_lora_weights=init, task_type=TASKS[arch], **args)


def ia3_config(arch: str, init: bool | str = True, **kw: Any) -> IA3Config:
    """IA3 with the architecture's defaults: k, v and the feed-forward output projection."""
    assert isinstance(init, bool)
    return IA3Config(init_ia3_weights=init, task_type=TASKS[arch], **kw)


METHODS: dict[str, Callable[..., PeftConfig]] = {"lora": lora_config, "ia3": ia3_config}
CASES = [(m, a) for m in METHODS for a in ARCHS]
CASE_IDS = [f"{m}-{a}" for m, a in CASES]


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def assert_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), f"max |diff| = {(a - b).abs().max().item():.3e}"


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different: by more than 0.1% of the outputs' scale (far above fp32 noise)."""
    return bool((a - b).abs().max() > 1e-3 * b.abs().max())


def perturb(params: Iterable[nn.Parameter], seed: int = 0, scale: float = 0.3) -> None:
    """Move parameters away from any identity init, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def sub(model: nn.Module, path: str) -> Any:
    """A submodule by dotted path, typed loosely for attribute access in tests."""
    return model.get_submodule(path)


def wrappers_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (AdaptedModule, ModulesToSave))]


def module_classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def loss_of(out: Any) -> torch.Tensor:
    """A loss that reaches every logit (squared, so gradients do not cancel)."""
    return out.logits.float().pow(2).mean()


# ---- HF PEFT as the reference ----------------------------------------------------------------
def peft_name(path: str, adapter: str) -> str:
    """PEFT's parameter name for one of ours (both relative to the respective PeftModel).

    ``base_model.<m>.adapters.<a>.<head>[.<rest>]`` -> ``base_model.model.<m>.<head>.<a>[.<rest>]``;
    modules_to_save and bias paths only gain PEFT's extra ``model.`` level.
    """
    assert path.startswith("base_model."), path
    inner = path[len("base_model.") :]
    marker = f".adapters.{adapter}."
    if marker in inner:
        module, rest = inner.split(marker)
        head, _, tail = rest.partition(".")
        inner = f"{module}.{head}.{adapter}" + (f".{tail}" if tail else "")
    return f"base_model.model.{inner}"


def peft_twin(ours: PeftModel, arch: str, config: Any, adapter: str = "default", seed: int = 0) -> Any:
    """PEFT's model for ``config`` on the same base, carrying our adapter's current weights.

    Fails if any PEFT adapter parameter is left uncopied, so the name mapping is complete.
    """
    twin = peft.get_peft_model(build_model(arch, seed), config, adapter_name=adapter)
    theirs = dict(twin.named_parameters())
    copied: set[str] = set()
    with torch.no_grad():
        for path, p in ours.adapter_parameters(adapter).items():
            name = peft_name(path, adapter)
            assert name in theirs, f"{path} -> {name} is not a PEFT parameter"
            theirs[name].copy_(p)
            copied.add(name)
    trainable = {n for n, p in twin.named_parameters() if p.requires_grad}
    assert trainable <= copied, f"not copied: {sorted(trainable - copied)[:5]}"
    # beyond PEFT's trainable set only a head's frozen original (bias="all" declares its bias)
    assert all(".original_module." in n for n in copied - trainable), sorted(copied - trainable)
    twin.eval()
    return twin


def check_equal_to_peft(arch: str, ours_config: PeftConfig, peft_config: Any) -> None:
    """A non-trivially initialised peftlab adapter and its PEFT twin give equal outputs, and
    equal weights once both are merged (Conv1D layout included)."""
    from conftest import model_output, sample_inputs
    from peftlab import get_peft_model

    ours = get_peft_model(build_model(arch), ours_config)
    perturb(ours.adapter_parameters("default").values(), scale=0.1)  # biases, head copies too
    twin = peft_twin(ours, arch, peft_config)
    inputs = sample_inputs(arch)
    out = model_output(ours, inputs)
    assert differs(out, model_output(build_model(arch), inputs))
    assert_close(out, model_output(twin, inputs))
    mine = ours.merge_and_unload().state_dict()
    for k, w in twin.merge_and_unload().state_dict().items():
        assert_close(mine[k], w, atol=1e-6)
