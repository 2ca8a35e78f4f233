"""FSDP for peftlab models (``peftlab.integrations.fsdp``): which modules become units, and on CPU with gloo
(2 processes) that FSDP2 and FSDP1 keep trainable and frozen weights in separate units, train
only the adapters, and match a single-process step on the same global batch."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import build_model, sample_inputs
from peftlab import BottleneckConfig, IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from peftlab.core.layers import AdaptedModule, AdapterUnit, ModulesToSave
from peftlab.integrations.fsdp import block_classes, fsdp_auto_wrap_policy, fsdp_units

WORLD = 2


def _configs() -> dict[str, Any]:
    return {
        "lora": LoraConfig(r=4, init_lora_weights=False),
        "ia3": IA3Config(init_ia3_weights=False),
        "bottleneck": BottleneckConfig(init_weights="bert"),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }


def _model(method: str) -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), _configs()[method])
    with torch.no_grad():  # away from identity (LoRA B = 0, IA3 = 1, bottleneck up = 0 at init)
        g = torch.Generator().manual_seed(1)
        for p in model.adapter_parameters("default").values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    return model


# ---- which modules become units (no processes) ----------------------------------------------
def test_block_classes_come_from_no_split_modules() -> None:
    assert [c.__name__ for c in block_classes(build_model("llama"))] == ["LlamaDecoderLayer"]
    assert [c.__name__ for c in block_classes(build_model("bart"))] == [
        "BartDecoderLayer",
        "BartEncoderLayer",
    ]
    with pytest.raises(ValueError, match="no module of class"):
        block_classes(build_model("llama"), ["GPT2Block"])


def test_fsdp2_units_are_adapter_units_then_blocks() -> None:
    model = _model("lora")
    units = fsdp_units(model)
    lora = [m for m in model.modules() if isinstance(m, AdapterUnit)]
    blocks = list(model.get_base_model().model.layers)
    assert len(lora) == 4 and units == [*lora, *blocks]


def test_fsdp1_policy_wraps_base_layer_and_wrapper_apart() -> None:
    model = _model("lora")
    units = fsdp_units(model, fsdp1=True)
    wrappers = [m for m in model.modules() if isinstance(m, AdaptedModule)]
    assert {id(m) for m in units} == {
        *(id(w) for w in wrappers),
        *(id(w.base_layer) for w in wrappers),
        *(id(b) for b in model.get_base_model().model.layers),
    }
    assert not any(isinstance(m, AdapterUnit) for m in units)
    policy = fsdp_auto_wrap_policy(model)
    assert type(policy).__name__ == "CustomPolicy"


def test_classification_head_copy_is_its_own_unit() -> None:
    model = get_peft_model(build_model("bert"), LoraConfig(r=2, task_type="SEQ_CLS"))
    units = fsdp_units(model)
    saved = next(m for m in model.modules() if isinstance(m, ModulesToSave))
    assert any(u is saved.modules_to_save["default"] for u in units)
    assert not any(u is saved.original_module for u in units)
    assert {type(u).__name__ for u in units} >= {"BertLayer", "BertEmbeddings"}


def test_mixed_units_and_fsdp1_prefix_are_refused() -> None:
    biased = get_peft_model(build_model("gpt2"), LoraConfig(r=2, bias="lora_only"))
    with pytest.raises(ValueError, match="bias='none'"):
        fsdp_units(biased)
    with pytest.raises(ValueError, match="apply_fsdp2"):
        fsdp_units(_model("prefix"), fsdp1=True)
    # FSDP1 groups one layer's adapters: a frozen second adapter beside the trained one
    two = _model("lora")
    two.add_adapter("other", LoraConfig(r=2))
    assert len(fsdp_units(two)) == 8 + 2  # FSDP2: one unit per adapter unit, fine
    with pytest.raises(ValueError, match="delete the frozen adapters"):
        fsdp_units(two, fsdp1=True)
    with pytest.raises(TypeError, match="PeftModel"):
        fsdp_units(build_model("llama"))


# ---- 2 processes, gloo, CPU -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _steps(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def _check_fsdp2(rank: int, out: Path) -> None:
    from peftlab.integrations.fsdp import apply_fsdp2, save_pretrained, shard_groups

    batch = sample_inputs("llama", batch=2 * WORLD, seq=7)
    mine = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    for method in _configs():
        model = _model(method)
        reference = copy.deepcopy(model)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        adapter = set(model.adapter_parameters("default"))
        apply_fsdp2(model)

        groups = shard_groups(model)
        params = dict(model.named_parameters())
        for unit, names in groups.items():
            kinds = {params[n].requires_grad for n in names}
            assert len(kinds) == 1, f"{method}: unit {unit!r} mixes trainable and frozen"
            assert kinds == {True} or not set(names) & adapter
        assert {n for unit, names in groups.items() for n in names if params[n].requires_grad} == adapter

        _steps(model, mine)
        _steps(reference, batch)
        for name, p in model.named_parameters():
            full = _full(p.detach())
            want = dict(reference.named_parameters())[name].detach()
            torch.testing.assert_close(full, want, atol=1e-5, rtol=0, msg=f"{method}: {name}")
            if name in adapter:
                assert not torch.equal(full, start[name]), f"{method}: {name} did not train"
            else:
                assert torch.equal(full, start[name]), f"{method}: frozen {name} changed"

        # the sharded adapter saves as the usual checkpoint (rank 0 writes)
        save_pretrained(model, out / method)
        if rank == 0:
            loaded = PeftModel.from_pretrained(build_model("llama"), out / method)
            reference.eval()
            with torch.no_grad():
                torch.testing.assert_close(
                    loaded(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=0, msg=method
                )


def _check_fsdp1(rank: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    batch = sample_inputs("llama", batch=2 * WORLD, seq=7)
    mine = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    cpu = torch.device("cpu")
    for method in ("lora", "ia3", "bottleneck"):
        model = _model(method)
        reference = copy.deepcopy(model)
        if method == "lora":
            # the control: wrapping blocks alone puts adapters and base weights in one flat param
            blocks = ModuleWrapPolicy(set(block_classes(model)))
            with pytest.raises(ValueError, match="requires_grad"):
                FSDP(copy.deepcopy(model), auto_wrap_policy=blocks, use_orig_params=False, device_id=cpu)
        adapter = set(model.adapter_parameters("default"))
        # use_orig_params=False: FSDP1 itself refuses a flat parameter mixing requires_grad
        sharded = FSDP(
            model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False, device_id=cpu
        )
        flat = [m._flat_param for m in FSDP.fsdp_modules(sharded) if m._flat_param is not None]
        trainable_fqns = {
            f"{prefix}{fqn}"
            for m in FSDP.fsdp_modules(sharded)
            if m._flat_param is not None and m._flat_param.requires_grad
            for prefix in [_fqn_prefix(sharded, m)]
            for fqn in m._flat_param._fqns
        }
        assert trainable_fqns == adapter, method
        assert any(not f.requires_grad for f in flat)
        _steps(sharded, mine)
        _steps(reference, batch)
        with FSDP.summon_full_params(sharded):
            got = {
                n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for n, p in sharded.named_parameters()
            }
        for name, want in reference.named_parameters():
            torch.testing.assert_close(got[name], want.detach(), atol=1e-5, rtol=0, msg=f"{method}: {name}")


def _fqn_prefix(root: nn.Module, unit: nn.Module) -> str:
    path = next(n for n, m in root.named_modules() if m is unit)
    path = path.replace("_fsdp_wrapped_module.", "").replace("_fsdp_wrapped_module", "")
    return f"{path}." if path else ""


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _check_fsdp2(rank, Path(out))
        _check_fsdp1(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_sharded_training_matches_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
