"""``pip install 'peftlab[train]'`` is all ``peftlab train`` needs, on data of every kind
(prompt/completion, text/label, chat rows), evaluation metrics included.

The runs happen in a subprocess where only the distributions that the core and the ``train``
extra require (read from pyproject.toml, followed through the installed packages' metadata)
can be imported: every other installed package (the compare, serve, quant, gguf and hf extras,
the trackers, scikit-learn, rouge-score, the dev tools) is blocked by a meta-path finder, as a
machine with only ``peftlab[train]`` installed would lack it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from test_chat import CHATML
from test_training import save_tiny_causal_lm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# runs cli.main on each argv list (argv[2], JSON) with the modules in argv[1] unimportable
SCRIPT = """
import importlib.abc, importlib.util, json, sys
BLOCKED = frozenset(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in peftlab[train])", name=name)
        return None

sys.meta_path.insert(0, Block())
real_find_spec = importlib.util.find_spec

def find_spec(name, *args, **kwargs):  # how transformers and others probe for optional packages
    return None if name.partition(".")[0] in BLOCKED else real_find_spec(name, *args, **kwargs)

importlib.util.find_spec = find_spec

from peftlab import cli
codes = [cli.main(argv) for argv in json.loads(sys.argv[2])]
leaked = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps({"codes": codes, "leaked": leaked}))
"""


def installed_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions that ``requirements`` pull in, following
    each one's own requirements (extras and environment markers honoured)."""
    found: set[str] = set()
    done: set[tuple[str, str]] = set()
    todo = [(Requirement(text), "") for text in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in ("", *sorted(requirement.extras)):
            if (name, wanted) in done:
                continue
            done.add((name, wanted))
            try:
                requires = importlib.metadata.distribution(name).requires or []
            except importlib.metadata.PackageNotFoundError:
                continue
            found.add(name)
            todo += [(Requirement(text), wanted) for text in requires]
    return found


def modules_outside(extras: tuple[str, ...]) -> list[str]:
    """Top-level modules of installed distributions that the core plus ``extras`` do not need."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    allowed = installed_closure(wanted) | {"peftlab"}
    return sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if module.isidentifier()
        and module not in sys.stdlib_module_names
        and not any(canonicalize_name(d) in allowed for d in dists)
    )


def run_blocked(blocked: list[str], runs: list[list[str]]) -> tuple[dict[str, Any], str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(blocked), json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def blocked() -> list[str]:
    modules = modules_outside(("train",))
    # the check is only as good as this list: the other applications' packages are on it
    installed = set(importlib.metadata.packages_distributions())
    others = ("optuna", "matplotlib", "sklearn", "rouge_score", "fastapi", "uvicorn", "gguf", "datasets")
    for module in (*others, "bitsandbytes", "tensorboard", "mlflow", "trackio"):
        assert module not in installed or module in modules, module
    assert "yaml" not in modules and "sacrebleu" not in modules and "torch" not in modules
    return modules


def test_train_runs_on_every_data_kind_with_only_the_train_extra(blocked: list[str], tmp_path: Path) -> None:
    model = save_tiny_causal_lm(tmp_path / "model")
    items = [(w, i) for i in range(6) for w in ("alpha", "bravo", "delta", "gamma")]
    generation = _jsonl(
        tmp_path / "qa.jsonl",
        [
            {"prompt": f"Text: {w} {i}\nJSON:", "completion": f' {{"word": "{w}", "n": {i}}}'}
            for w, i in items
        ],
    )
    classification = tmp_path / "reviews.csv"
    labels = {"alpha": "sports", "bravo": "sports", "delta": "food", "gamma": "food"}
    classification.write_text("text,label\n" + "".join(f"{w} {i} again,{labels[w]}\n" for w, i in items))
    chat = _jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [_turn("user", f"say {w} {i}"), _turn("assistant", f"{w} {i}")]} for w, i in items],
    )
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    # the text/label run comes from a YAML run file (the train extra's pyyaml)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"data: {classification}\nmethod: lora\nlr: 1e-3\n")
    common = ["--model", str(model), "--steps", "2", "--batch-size", "4"]
    common += ["--num-eval", "4", "--save-every", "0"]
    runs = {
        "generation": ["train", "--data", str(generation), *common],
        "classification": ["train", "--config", str(run_file), *common],
        "chat": ["train", "--data", str(chat), "--chat-template", str(template), *common],
    }
    argvs = [[*argv, "--out", str(tmp_path / kind)] for kind, argv in runs.items()]
    result, stderr = run_blocked(blocked, argvs)
    assert result == {"codes": [0, 0, 0], "leaked": []}, stderr[-4000:]

    expected = {
        "generation": {"eval_loss", "exact_match", "token_f1", "rouge_l", "bleu", "valid_json"},
        "classification": {"eval_loss", "accuracy", "macro_f1", "valid_label"},
        "chat": {"eval_loss", "exact_match", "token_f1", "rouge_l", "bleu"},
    }
    for kind, keys in expected.items():
        out = tmp_path / kind
        metrics = json.loads((out / "metrics.json").read_text())
        assert keys <= set(metrics["final_eval"]), (kind, metrics["final_eval"])
        assert metrics["steps"] == 2 and (out / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "classification" / "metrics.json").read_text())["config"]["lr"] == 1e-3


def test_without_sacrebleu_generation_data_names_the_train_extra(blocked: list[str], tmp_path: Path) -> None:
    """The blocking bites (BLEU needs sacrebleu) and the error names the extra that has it."""
    model = save_tiny_causal_lm(tmp_path / "model")
    data = _jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Q {i}?", "completion": f" A {i}"} for i in range(12)])
    argv = ["train", "--model", str(model), "--data", str(data), "--steps", "1", "--batch-size", "4"]
    argv += ["--num-eval", "2", "--save-every", "0", "--out", str(tmp_path / "out")]
    result, stderr = run_blocked([*blocked, "sacrebleu"], [argv])
    assert result["codes"] == [2]
    assert (
        "BLEU needs the 'sacrebleu' package, which is not installed: "
        "pip install 'peftlab[train]' (or pip install sacrebleu)"
    ) in stderr
