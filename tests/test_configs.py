"""Configs: validation names the field, dict/JSON round trips, and PEFT-written configs read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest

from peftlab import IA3Config, LoraConfig, PeftConfig, TaskType


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -4}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"task_type": "CAUSAL"}, "task_type"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"layers_to_transform": -2}, "layers_to_transform"),
        ({"layers_to_transform": [0, "1"]}, "layers_to_transform"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ""}, "target_modules"),
        ({"target_modules": ["q_proj", ""]}, "target_modules"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={w}" for k, w in v.items()),
)
def test_lora_invalid_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_modules": ["k", "v"], "feedforward_modules": ["wo"]}, "feedforward_modules"),
        ({"target_modules": ["k", "wo"], "feedforward_modules": ["wo", "wi"]}, "feedforward_modules"),
        ({"init_ia3_weights": "ones"}, "init_ia3_weights"),
        ({"task_type": "seq-cls"}, "task_type"),
        ({"target_modules": []}, "target_modules"),
        ({"modules_to_save": [""]}, "modules_to_save"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={w}" for k, w in v.items()),
)
def test_ia3_invalid_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        IA3Config(**kwargs)


def test_error_messages_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="none, all, lora_only"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        LoraConfig(task_type="CAUSAL")
    with pytest.raises(ValueError, match=r"\['wi'\] are not in target_modules"):
        IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo", "wi"])


def test_valid_values_are_normalised() -> None:
    config = LoraConfig(task_type="SEQ_CLS", layers_to_transform=3, target_modules={"v_proj", "q_proj"})  # type: ignore[arg-type]
    assert config.task_type is TaskType.SEQ_CLS
    assert config.layers_to_transform == [3]
    assert config.target_modules == ["q_proj", "v_proj"]
    assert LoraConfig(init_lora_weights="gaussian", lora_dropout=0.0, r=1).scaling == 16
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    assert IA3Config(target_modules=r".*\.v", feedforward_modules=["wo"]).target_modules == r".*\.v"


CONFIGS: list[PeftConfig] = [
    LoraConfig(),
    LoraConfig(
        r=4,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules="all-linear",
        bias="lora_only",
        use_rslora=True,
        init_lora_weights="gaussian",
        modules_to_save=["lm_head"],
        layers_to_transform=[0, 2],
        task_type=TaskType.CAUSAL_LM,
    ),
    IA3Config(),
    IA3Config(
        target_modules=["k", "v", "wo"],
        feedforward_modules=["wo"],
        init_ia3_weights=False,
        modules_to_save=["classifier"],
        task_type="SEQ_2_SEQ_LM",
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c)[:60])
def test_dict_and_json_round_trip(config: PeftConfig) -> None:
    data = config.to_dict()
    assert data["peft_type"] == config.peft_type
    text = json.dumps(data)  # plain JSON types only (enums as their values)
    assert type(config).from_dict(data) == config
    assert PeftConfig.from_dict(json.loads(text)) == config  # dispatch on peft_type
    assert PeftConfig.from_dict(json.loads(config.to_json_string())) == config


PEFT_CONFIGS: list[tuple[Any, PeftConfig]] = [
    (
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ),
    (
        peft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["query", "value"],
            use_rslora=True,
            bias="all",
            lora_dropout=0.05,
            layers_to_transform=[1],
            modules_to_save=["classifier"],
            task_type=peft.TaskType.SEQ_CLS,
        ),
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["query", "value"],
            use_rslora=True,
            bias="all",
            lora_dropout=0.05,
            layers_to_transform=[1],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
    ),
    (
        peft.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
        IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
    ),
]


def canonical(config: PeftConfig) -> dict[str, Any]:
    """to_dict() with module-name lists sorted: PEFT stores them as sets, so order is arbitrary."""
    return {
        k: sorted(v) if isinstance(v, list) and k.endswith("modules") else v
        for k, v in config.to_dict().items()
    }


@pytest.mark.parametrize(("theirs", "ours"), PEFT_CONFIGS, ids=["lora-qv", "lora-options", "ia3"])
def test_reads_peft_written_configs(theirs: Any, ours: PeftConfig, tmp_path: Path) -> None:
    # PEFT's to_dict() keeps its enum and set types; its saved JSON has plain values
    assert canonical(type(ours).from_dict(theirs.to_dict())) == canonical(ours)
    assert canonical(PeftConfig.from_dict(theirs.to_dict())) == canonical(ours)
    theirs.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = PeftConfig.from_dict(saved)
    assert type(loaded) is type(ours) and canonical(loaded) == canonical(ours)


def test_peft_reads_our_configs() -> None:
    ours = LoraConfig(r=4, target_modules=["q_proj"], use_rslora=True, task_type="CAUSAL_LM")
    theirs = peft.LoraConfig.from_peft_type(**ours.to_dict())
    assert (theirs.r, theirs.use_rslora, theirs.target_modules) == (4, True, {"q_proj"})
    assert theirs.peft_type == peft.PeftType.LORA and theirs.task_type == "CAUSAL_LM"


def test_unknown_or_unsupported_fields_raise() -> None:
    data = LoraConfig().to_dict()
    with pytest.raises(ValueError, match=r"unknown field 'rank'.*known fields are"):
        LoraConfig.from_dict({**data, "rank": 8})
    with pytest.raises(ValueError, match=r"'use_dora'=True.*not support"):
        LoraConfig.from_dict({**data, "use_dora": True})
    with pytest.raises(ValueError, match=r"'rank_pattern'.*not support"):
        PeftConfig.from_dict({**data, "rank_pattern": {"q_proj": 4}})
    # PEFT's defaults for options peftlab lacks are accepted: they change nothing
    assert LoraConfig.from_dict({**data, "use_dora": False, "rank_pattern": {}}) == LoraConfig()


def test_peft_type_mismatch_or_missing_raises() -> None:
    with pytest.raises(ValueError, match="expects 'LORA'"):
        LoraConfig.from_dict(IA3Config().to_dict())
    with pytest.raises(ValueError, match="no 'peft_type'"):
        PeftConfig.from_dict({"r": 4})
    with pytest.raises(ValueError, match=r"unknown peft_type 'LOHA'.*LORA"):
        PeftConfig.from_dict({"peft_type": "LOHA"})
    with pytest.raises(ValueError, match=r"^r:"):
        PeftConfig.from_dict({**LoraConfig().to_dict(), "r": 0})  # validation applies on load
