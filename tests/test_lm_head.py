"""Logits only where the loss is: the selective, chunked head gives the plain path's loss and
gradients (fp32, within 1e-5) for every method and full fine-tuning, never builds a
``batch x seq x vocab`` tensor, and label scoring agrees with the full-logits path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from peftlab import BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from peftlab.training import classify, lm_head
from peftlab.training.encoding import Encoded, collate
from peftlab.training.lm_head import causal_lm_loss_sum, linear_cross_entropy, supervised_loss_sum
from test_training import tiny_llama

VOCAB = 61


def _nonzero(model: nn.Module) -> nn.Module:
    """Adapters away from their identity init: LoRA B != 0, IA3 != 1, bottleneck up != 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(k in name for k in ("lora_B", "ia3_l", "adapter_up")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "full": lambda m: m.requires_grad_(True),
    "lora": lambda m: get_peft_model(m, LoraConfig(r=4, task_type=TaskType.CAUSAL_LM)),
    "ia3": lambda m: get_peft_model(m, IA3Config(task_type=TaskType.CAUSAL_LM)),
    "bottleneck": lambda m: get_peft_model(
        m, BottleneckConfig(bottleneck_size=8, task_type=TaskType.CAUSAL_LM)
    ),
    "prefix": lambda m: get_peft_model(
        m, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    ),
}


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for length, prompt in ((9, 4), (6, 2), (11, 7)):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append(Encoded(ids, [-100] * prompt + ids[prompt:]))
    batch = collate(rows, pad_token_id=0)
    return batch, batch.pop("labels")


def _loss_and_grads(model: nn.Module, selective: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch, labels = _batch()
    model.zero_grad(set_to_none=True)
    if selective:
        loss = supervised_loss_sum(model, model, batch, labels)
    else:
        loss = causal_lm_loss_sum(model(**batch).logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("chunk", [lm_head.CHUNK_ELEMENTS, VOCAB * 2])  # one chunk, and chunks of 2 rows
def test_loss_and_gradients_equal_the_plain_path(
    method: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    model = _nonzero(METHODS[method](tiny_llama(VOCAB)))
    model.train()
    plain_loss, plain = _loss_and_grads(model, selective=False)
    loss, grads = _loss_and_grads(model, selective=True)
    assert torch.allclose(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(plain) and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, plain[name], rtol=1e-5, atol=1e-6), name


def test_no_full_logits_are_made() -> None:
    model = get_peft_model(tiny_llama(VOCAB), LoraConfig(r=4, task_type=TaskType.CAUSAL_LM))
    shapes: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    batch, labels = _batch()
    supervised_loss_sum(model, model, batch, labels).backward()
    handle.remove()
    assert shapes == [(3, 0, VOCAB)]  # the head ran on zero positions


def test_per_position_losses_match_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 5, generator=g), torch.randn(13, 5, generator=g)
    bias, targets = torch.randn(13, generator=g), torch.randint(0, 13, (7,), generator=g)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")
    got = linear_cross_entropy(hidden, weight, bias, targets, reduction="none")
    assert torch.allclose(got, expected, atol=1e-6)
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    linear_cross_entropy(h, w, b, targets).backward()
    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    torch.nn.functional.cross_entropy(h2 @ w2.T + b2, targets, reduction="sum").backward()
    for a, c in ((h, h2), (w, w2), (b, b2)):
        assert a.grad is not None and c.grad is not None
        assert torch.allclose(a.grad, c.grad, atol=1e-5)


@pytest.mark.parametrize("labels", [("good", "bad"), ("good film", "bad plot")])  # one token / several
def test_label_scoring_matches_the_full_logits_path(
    labels: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_training import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    label_ids = [tok(" " + lab, add_special_tokens=False)["input_ids"] for lab in labels]
    encoded = []
    for i, text in enumerate(["the film was good", "a dull plot", "the movie"]):
        prompt = tok(text)["input_ids"]
        target = label_ids[i % 2] + [tok.eos_token_id]
        encoded.append(Encoded(prompt + target, [-100] * len(prompt) + target))
    fast = classify.score_label_words(model, tok, encoded, labels, pad_token_id=0)
    monkeypatch.setattr(classify, "hidden_and_head", lambda f, m, b: (f(**b), None, None))
    plain = classify.score_label_words(model, tok, encoded, labels, pad_token_id=0)
    assert fast[0] == plain[0]
    assert fast[1] == pytest.approx(plain[1], rel=1e-5)
