"""Activation outputs recomputed in backward instead of kept: loss and gradients bit-identical to
the plain forward pass for every method and full fine-tuning, the gated MLP's activation really
recomputed (once per layer), nothing recomputed where keeping the input would cost (Tanh keeps
its output), and the training loop uses it. Grouped-query attention on padded rows keeps its
key/value heads unexpanded on the CPU: the same loss and gradients within fp32 rounding, fewer
bytes saved for backward, the switch restored after, and the training loop uses it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from peftlab import LoraConfig, TaskType, get_peft_model
from peftlab.training import saved_activations
from peftlab.training.encoding import Encoded
from peftlab.training.lm_head import supervised_loss_sum
from peftlab.training.loop import TrainConfig, TrainLoop
from peftlab.training.saved_activations import (
    FORCE_GQA_ENV,
    activation_modules,
    grouped_sdpa_on_cpu,
    recomputed_activations,
    unexpanded_kv_heads,
)
from test_lm_head import METHODS, VOCAB, _batch, _nonzero
from test_training import tiny_llama


@pytest.fixture
def recomputed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the outputs the backward pass recomputed (by module class)."""
    calls: list[str] = []
    unpack = saved_activations._unpack

    def counting(saved: Any) -> Any:
        if isinstance(saved, saved_activations._Recompute):
            calls.append(type(saved.module).__name__)
        return unpack(saved)

    monkeypatch.setattr(saved_activations, "_unpack", counting)
    return calls


def _loss_and_grads(model: nn.Module, recompute: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch, labels = _batch()
    model.zero_grad(set_to_none=True)
    if recompute:
        with recomputed_activations(model):
            loss = supervised_loss_sum(model, model, batch, labels)
    else:
        loss = supervised_loss_sum(model, model, batch, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_identical(grads: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    assert set(grads) == set(plain) and grads
    for name, grad in grads.items():
        assert torch.equal(grad, plain[name]), name


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_are_bit_identical_and_the_mlp_activation_is_recomputed(
    method: str, recomputed: list[str]
) -> None:
    torch.manual_seed(0)
    model = _nonzero(METHODS[method](tiny_llama(VOCAB)))
    model.train()
    loss, plain = _loss_and_grads(model, recompute=False)
    assert recomputed == []
    loss2, grads = _loss_and_grads(model, recompute=True)
    assert recomputed == ["SiLUActivation"] * 2  # one per decoder layer (2 layers)
    assert torch.equal(loss, loss2)
    _assert_identical(grads, plain)


def _neox() -> nn.Module:
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(config)


def test_a_gelu_mlp_is_recomputed_in_full_fine_tuning_lora_needs_not(recomputed: list[str]) -> None:
    torch.manual_seed(0)
    model = _neox().train()
    _, plain = _loss_and_grads(model, recompute=False)
    _, grads = _loss_and_grads(model, recompute=True)
    # full fine-tuning: dense_4h_to_h's weight trains, so its matmul keeps the GELU output: recomputed
    assert recomputed == ["GELUActivation"] * 2
    _assert_identical(grads, plain)
    recomputed.clear()
    config = LoraConfig(r=4, target_modules=["query_key_value"], task_type=TaskType.CAUSAL_LM)
    lora = _nonzero(get_peft_model(_neox(), config))
    _loss_and_grads(lora, recompute=True)
    assert recomputed == []  # a frozen dense_4h_to_h keeps nothing of its input


def test_an_activation_output_kept_as_a_view_is_recomputed_as_that_view(recomputed: list[str]) -> None:
    # GPT-2's Conv1D flattens the GELU output (NewGELU, written in Python ops) before its matmul
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    _, plain = _loss_and_grads(model, recompute=False)
    _, grads = _loss_and_grads(model, recompute=True)
    assert recomputed == ["NewGELUActivation"] * 2
    _assert_identical(grads, plain)


class _MLP(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (nn.SiLU, 1),
        (nn.GELU, 1),
        (nn.Tanh, 0),  # keeps its output, not its input: recomputing would keep more
        (lambda: nn.ReLU(inplace=True), 0),  # in place: its input is gone
        (nn.RReLU, 0),  # random
        (nn.PReLU, 0),  # has a parameter
    ],
    ids=["silu", "gelu", "tanh", "relu-inplace", "rrelu", "prelu"],
)
def test_only_pure_activations_that_keep_their_input_are_recomputed(
    make: Callable[[], nn.Module], expected: int, recomputed: list[str]
) -> None:
    torch.manual_seed(0)
    mlp = _MLP(make()).train()
    x = torch.randn(4, 8, requires_grad=True)
    torch.manual_seed(1)
    mlp(x).square().sum().backward()
    plain = [p.grad.clone() for p in mlp.parameters()] + [x.grad.clone()]  # type: ignore[union-attr]
    mlp.zero_grad()
    x.grad = None
    torch.manual_seed(1)
    with recomputed_activations(mlp):
        y = mlp(x)
    y.square().sum().backward()
    assert len(recomputed) == expected
    got = [p.grad for p in mlp.parameters()] + [x.grad]
    assert all(a is not None and torch.equal(a, b) for a, b in zip(got, plain, strict=True))


def test_no_hooks_are_left_behind_and_eval_is_untouched(recomputed: list[str]) -> None:
    model = tiny_llama(VOCAB)
    act = activation_modules(model)[0]
    with torch.no_grad(), recomputed_activations(model):
        model(torch.tensor([[3, 4, 5]]))
    with recomputed_activations(model):
        pass
    assert not act._forward_hooks
    assert recomputed == []


def _rows() -> list[Encoded]:
    """8 training rows of 8-10 tokens (batches of them are padded), the first 3 not supervised."""
    g = torch.Generator().manual_seed(2)
    data = []
    for i in range(8):
        ids = torch.randint(3, VOCAB, (8 + i % 3,), generator=g).tolist()
        data.append(Encoded(ids, [-100] * 3 + ids[3:]))
    return data


def test_the_training_loop_recomputes(recomputed: list[str]) -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(VOCAB), LoraConfig(r=4, task_type=TaskType.CAUSAL_LM))
    data = _rows()
    TrainLoop(model, data, TrainConfig(steps=2, batch_size=4, seed=0), pad_token_id=0).run(progress=False)
    assert recomputed == ["SiLUActivation"] * 4  # 2 layers x 2 steps


def _saved_bytes_loss_and_grads(
    model: nn.Module, unexpanded: bool
) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Bytes of the activations autograd keeps (distinct storages, weights excluded), the loss
    and the gradients of one forward and backward pass over a padded batch."""
    batch, labels = _batch()
    assert not bool(batch["attention_mask"].all())  # padded rows: transformers passes a mask
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    context = unexpanded_kv_heads(model) if unexpanded else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        loss = supervised_loss_sum(model, model, batch, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(saved.values()), loss.detach(), grads


@pytest.mark.parametrize("method", ["full", "lora"])
def test_grouped_attention_on_padded_rows_keeps_key_value_heads_unexpanded(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FORCE_GQA_ENV, raising=False)
    torch.manual_seed(0)
    model: nn.Module = tiny_llama(VOCAB)  # 4 query heads, 2 key/value heads, sdpa
    assert grouped_sdpa_on_cpu(model)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, task_type=TaskType.CAUSAL_LM))
        _nonzero(model)
        assert grouped_sdpa_on_cpu(model)
    else:
        model.requires_grad_(True)
    model.train()
    plain_bytes, plain_loss, plain = _saved_bytes_loss_and_grads(model, unexpanded=False)
    bytes_, loss, grads = _saved_bytes_loss_and_grads(model, unexpanded=True)
    assert FORCE_GQA_ENV not in os.environ  # restored
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(plain) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-5, msg=name)
    # per layer, keys and values are kept with 2 heads, not repeated to 4: 2 x batch x 2 heads x
    # seq x head_dim fp32 fewer
    batch, _ = _batch()
    rows, seq = batch["input_ids"].shape
    config: Any = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    repeated = config.num_attention_heads - config.num_key_value_heads
    assert plain_bytes - bytes_ == config.num_hidden_layers * 2 * rows * repeated * seq * head_dim * 4


def test_unexpanded_heads_only_where_they_help_and_a_users_switch_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(FORCE_GQA_ENV, raising=False)
    seen: list[str | None] = []
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    assert not grouped_sdpa_on_cpu(gpt2)  # no grouped key/value heads
    with unexpanded_kv_heads(gpt2):
        seen.append(os.environ.get(FORCE_GQA_ENV))
    eager = tiny_llama(VOCAB)
    eager.config._attn_implementation = "eager"
    assert not grouped_sdpa_on_cpu(eager)  # not sdpa: nothing to ask
    llama = tiny_llama(VOCAB)
    with unexpanded_kv_heads(llama):
        seen.append(os.environ.get(FORCE_GQA_ENV))
    monkeypatch.setenv(FORCE_GQA_ENV, "0")  # the user's own setting wins
    with unexpanded_kv_heads(llama):
        seen.append(os.environ.get(FORCE_GQA_ENV))
    assert seen == [None, "1", "0"] and os.environ[FORCE_GQA_ENV] == "0"
    monkeypatch.delenv(FORCE_GQA_ENV)
    with pytest.raises(RuntimeError, match="boom"), unexpanded_kv_heads(llama):
        raise RuntimeError("boom")
    assert FORCE_GQA_ENV not in os.environ  # restored on an error too


def test_the_training_loop_keeps_key_value_heads_unexpanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORCE_GQA_ENV, raising=False)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(VOCAB), LoraConfig(r=4, task_type=TaskType.CAUSAL_LM))
    seen: list[str | None] = []
    attention = model.get_base_model().model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda *_: seen.append(os.environ.get(FORCE_GQA_ENV)))
    data = _rows()
    TrainLoop(model, data, TrainConfig(steps=2, batch_size=4, seed=0), pad_token_id=0).run(progress=False)
    handle.remove()
    assert seen == ["1", "1"] and FORCE_GQA_ENV not in os.environ


def test_activation_checkpointing_recomputes_with_the_same_unexpanded_heads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpointing runs each layer's forward again in backward: the switch must hold there too
    (else the recomputed keys/values are repeated and torch refuses their other shapes)."""
    monkeypatch.delenv(FORCE_GQA_ENV, raising=False)
    data = _rows()
    losses = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(VOCAB), LoraConfig(r=4, task_type=TaskType.CAUSAL_LM))
        _nonzero(model)
        if checkpointing:
            model.activation_checkpointing_enable()  # type: ignore[operator]
        loop = TrainLoop(model, data, TrainConfig(steps=2, batch_size=4, seed=0), pad_token_id=0)
        losses.append(loop.run(progress=False).losses)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)
    assert FORCE_GQA_ENV not in os.environ
