"""Few-row linear layers as ``weight @ x^T`` (``peftlab.serving.small_batch``): the same results
as ``F.linear`` within fp32 rounding, only where it applies, through a whole adapted model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import serve_helpers
from peftlab.serving import load_engine, small_batch
from peftlab.serving.small_batch import MAX_ROWS, SmallBatchLinear, _small_linear, wanted
from suite_helpers import assert_close


@pytest.mark.parametrize("shape", [(1, 16), (2, 16), (3, 1, 16), (2, 2, 16), (4, 16), (1, 1, 1, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_equal_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g)
    weight = torch.nn.Parameter(torch.randn(24, 16, generator=g))
    b = torch.randn(24, generator=g) if bias else None
    want = F.linear(x, weight, b)
    direct = _small_linear(x, weight, b)
    assert direct is not None and direct.shape == want.shape
    assert_close(direct, want, atol=1e-5)
    with SmallBatchLinear():
        assert_close(F.linear(x, weight, b), want, atol=1e-5)
        assert_close(F.linear(x, weight, bias=b), want, atol=1e-5)


def test_only_few_fp32_cpu_rows_take_the_path() -> None:
    w = torch.randn(8, 4)
    assert _small_linear(torch.randn(MAX_ROWS + 1, 4), w, None) is None
    assert _small_linear(torch.randn(3, 4, dtype=torch.float64), w.double(), None) is None
    assert _small_linear(torch.randn(3, 4, dtype=torch.bfloat16), w.bfloat16(), None) is None
    assert _small_linear(torch.randn(0, 4), w, None) is None
    assert _small_linear(torch.randn(2, 4), torch.randn(2, 8, 4), None) is None
    # shapes that F.linear refuses are refused as before
    with SmallBatchLinear(), pytest.raises(RuntimeError):
        F.linear(torch.randn(2, 5), w)


def test_an_adapted_model_gives_the_same_logits_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    original = small_batch._small_linear

    def counted(*args: Any) -> torch.Tensor | None:
        out = original(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(small_batch, "_small_linear", counted)
    model = serve_helpers.adapted_model()
    names = list(model.peft_config)
    ids = torch.randint(3, 90, (len(names), 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        with SmallBatchLinear():
            got = model(input_ids=ids, adapter_names=names).logits
    assert len(names) <= MAX_ROWS
    assert_close(got, want, atol=1e-5)
    # every projection of the decoding-sized call took the path (the model's and the adapters')
    assert len(taken) >= 7 * 2 + 1 and all(taken)


def test_choices() -> None:
    cpu = torch.device("cpu")
    assert wanted("auto", cpu) == torch.backends.mkl.is_available()
    assert wanted("auto", torch.device("cuda")) is False
    assert wanted("on", cpu) and not wanted("off", cpu)
    with pytest.raises(ValueError, match="small_batch_matmul must be one of auto, on, off"):
        wanted("yes", cpu)
    # refused before any model is loaded
    with pytest.raises(ValueError, match="got 'fast'"):
        load_engine("no/such/model", small_batch_matmul="fast")
