"""``peftlab merge``: the merged folder loads with plain transformers and gives the adapter's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, build_model, model_output, sample_inputs
from peftlab import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab.cli import main
from test_checkpoint import fake_prompt_method  # noqa: F401 (fixture)

IA3_LLAMA = ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")  # IA3's default targets


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny models' vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    tok.save_pretrained(folder)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    build_model("llama").save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def save_adapter(base_dir: Path, folder: Path, config: PeftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Save a perturbed adapter trained on the saved base; return (adapter outputs, base outputs)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.eval()
    base_out = model_output(base, sample_inputs("llama"))
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    return model_output(model, sample_inputs("llama")), base_out


@pytest.mark.parametrize(
    "config",
    [LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]), IA3Config()],
    ids=["lora", "ia3"],
)
def test_merge_loads_with_plain_transformers(
    base_dir: Path, tmp_path: Path, config: PeftConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected, base_out = save_adapter(base_dir, tmp_path / "adapter", config)
    assert (expected - base_out).abs().max() > 1e-3
    out = tmp_path / "merged"
    assert main(["merge", str(base_dir), str(tmp_path / "adapter"), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(name.startswith("adapter_") for name in files)
    merged = AutoModelForCausalLM.from_pretrained(out)
    merged.eval()
    assert not any("lora" in n or "ia3" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(model_output(merged, sample_inputs("llama")), expected, atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w5 w7")["input_ids"] == AutoTokenizer.from_pretrained(base_dir)("w5 w7")["input_ids"]
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_merge_dtype(base_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    save_adapter(base_dir, tmp_path / "adapter", LoraConfig(r=4))
    out = tmp_path / "merged"
    assert main(["merge", str(base_dir), str(tmp_path / "adapter"), str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_merge_refuses_to_overwrite(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    expected, _ = save_adapter(base_dir, tmp_path / "adapter", LoraConfig(r=4))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["merge", str(base_dir), str(tmp_path / "adapter"), str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert (out / "notes.txt").read_text() == "keep me"

    assert main([*argv, "--force"]) == 0
    assert not (out / "notes.txt").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(
        model_output(merged.eval(), sample_inputs("llama")), expected, atol=1e-5, rtol=0
    )

    # never into (or over) an input folder, even with --force
    assert main(["merge", str(base_dir), str(tmp_path / "adapter"), str(base_dir), "--force"]) == 2
    assert "overlaps" in capsys.readouterr().err
    assert (base_dir / "tokenizer.json").is_file()


@pytest.mark.usefixtures("fake_prompt_method")
def test_merge_unmergeable_method(base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_checkpoint import FakePromptConfig

    model = get_peft_model(build_model("llama"), FakePromptConfig())
    model.save_pretrained(tmp_path / "prompt")
    assert main(["merge", str(base_dir), str(tmp_path / "prompt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "FAKE_PROMPT adapter, which cannot be merged: virtual tokens are not weights" in err
    assert not (tmp_path / "out").exists()


def test_merge_bad_inputs(base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_adapter(base_dir, tmp_path / "adapter", LoraConfig(r=4))
    assert main(["merge", str(base_dir), str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "no-model"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    assert "cannot load the base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merged_equals_peftlab_merge_and_unload(base_dir: Path, tmp_path: Path) -> None:
    """The CLI result is exactly the library's merge_and_unload (same weights, bit for bit)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    save_adapter(base_dir, tmp_path / "adapter", IA3Config())
    assert main(["merge", str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    lib = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    state = lib.merge_and_unload().state_dict()
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == set(state)
    for key, value in written.items():
        assert torch.equal(value, state[key]), key
    # the merge did fold something: IA3's k, v and down projections (2 layers) left the base
    base = load_file(base_dir / "model.safetensors")
    assert set(base) == set(written)
    changed = {k for k in base if not torch.equal(base[k], written[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in IA3_LLAMA}
