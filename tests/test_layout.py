"""The package layout keeps its promises (docs/architecture.md): imports only go down the
layer table (read from the document itself, so the table and this test cannot drift), no import
cycles, no private name used across modules, the library core never imports an application,
and the core imports without the applications' optional packages.

Every import counts: top-level, inside functions and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "peftlab"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# the library: adapters on a model; it may import only itself
LIBRARY = ("peftlab.core", "peftlab.methods")
# packages only applications need (each an install extra)
# (pyyaml is not among them: huggingface_hub, which transformers needs, imports it)
APPLICATION_PACKAGES = (
    "matplotlib", "sklearn", "rouge_score", "optuna", "sacrebleu", "fastapi", "uvicorn", "datasets", "gguf",
    "prometheus_client", "bitsandbytes",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports(name: str) -> Iterator[tuple[str, str | None, int]]:
    """(imported peftlab module, the name taken from it or None, line) for every import."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "peftlab":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, node.module, node.level)
            if source.split(".")[0] != "peftlab":
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                if candidate in MODULES:
                    yield candidate, None, node.lineno
                else:
                    yield source, alias.name, node.lineno


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name) if target != name} for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in MODULES:
        if v not in index:
            visit(v)
    return found


def layer_table() -> list[tuple[str, list[str]]]:
    """(layer, its package paths) from docs/architecture.md's table, top layer first: a folder
    ends with ``/``; entries outside the package (``../``) are left out."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith("|layer|files|"))
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name, files = (cell.strip() for cell in line.strip("|").split("|")[:2])
        paths = [p for p in files.split("`")[1::2] if not p.startswith("../")]
        table.append((name, paths))
    return table


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """The index of ``module``'s row in ``table`` (0 = the top), or None when no row names it."""
    path = MODULES[module].relative_to(PACKAGE).as_posix()
    for index, (_, paths) in enumerate(table):
        if any(path.startswith(p) if p.endswith("/") else path == p for p in paths):
            return index
    return None


def upward_imports(edges: dict[str, set[str]], table: list[tuple[str, list[str]]]) -> list[str]:
    """Imports of a module from a layer above its own (its own layer and those below are fine)."""
    found = []
    for name, targets in edges.items():
        for target in targets:
            here, there = layer_of(name, table), layer_of(target, table)
            if target in MODULES and here is not None and there is not None and there < here:
                found.append(f"{name} ({table[here][0]}) imports {target} ({table[there][0]})")
    return sorted(found)


def test_every_module_has_a_layer() -> None:
    table = layer_table()
    assert len(table) >= 5, table
    assert [m for m in MODULES if layer_of(m, table) is None] == []


def test_imports_only_go_down_the_layer_table() -> None:
    assert upward_imports(graph(), layer_table()) == []


def test_layer_check_finds_a_planted_upward_import() -> None:
    """The check above could fail: the training loop importing ``peftlab.count`` (an
    application, a layer above training) is found."""
    edges = {name: set(targets) for name, targets in graph().items()}
    edges["peftlab.training.loop"].add("peftlab.count")
    assert upward_imports(edges, layer_table()) == [
        "peftlab.training.loop (training) imports peftlab.count (applications)"
    ]


def test_every_import_resolves_to_a_module() -> None:
    missing = [
        f"{name}:{line}: {target}"
        for name in MODULES
        for target, _, line in imports(name)
        if target not in MODULES
    ]
    assert not missing


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The check above could fail: a two-module loop is found."""
    edges = {name: set(targets) for name, targets in graph().items()}
    edges["peftlab.core.config"].add("peftlab.core.registry")
    assert any({"peftlab.core.config", "peftlab.core.registry"} <= set(c) for c in cycles(edges))


def test_no_private_name_imported_across_modules() -> None:
    bad = [
        f"{name}:{line}: from {source} import {taken}"
        for name in MODULES
        for source, taken, line in imports(name)
        if taken is not None and taken.startswith("_") and not taken.startswith("__")
    ]
    assert not bad


def _private_attributes(tree: ast.AST) -> set[str]:
    """``_names`` a module defines: functions, classes, attributes set on self or cls, globals."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_member_used_across_modules() -> None:
    """``obj._name`` where ``_name`` belongs to another peftlab module (e.g. ``model._frozen``
    outside the model's module) is a private member used across modules."""
    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    defined = {name: _private_attributes(tree) for name, tree in trees.items()}
    bad = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if (
                not isinstance(node, ast.Attribute)
                or not node.attr.startswith("_")
                or node.attr.startswith("__")
            ):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            owners = [other for other, names in defined.items() if node.attr in names and other != name]
            if owners and node.attr not in defined[name]:
                bad.append(f"{name}:{node.lineno}: .{node.attr} (defined in {', '.join(owners)})")
    assert not bad


def test_library_never_imports_an_application() -> None:
    bad = [
        f"{name}:{line}: imports {target}"
        for name in MODULES
        if name.startswith(LIBRARY)
        for target, _, line in imports(name)
        if not target.startswith(LIBRARY)
    ]
    assert not bad


def test_cli_modules_only_parse_arguments() -> None:
    """The command modules hold no training, loading or reporting code of their own: each is a
    parser and a call into the library (a command module longer than this is doing work)."""
    for name, path in MODULES.items():
        if name.startswith("peftlab.cli."):
            tree = ast.parse(path.read_text())
            functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
            assert "register" in functions, name
            assert "run" in functions, name


@pytest.mark.parametrize("blocked", [APPLICATION_PACKAGES])
def test_core_imports_without_application_packages(blocked: tuple[str, ...]) -> None:
    """With the applications' packages unimportable, the library imports and adapts a model,
    and an application that needs one says which install to run."""
    script = f"""
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, Block())
import importlib.util
real_find_spec = importlib.util.find_spec
def find_spec(name, *args):
    return None if name.split(".")[0] in BLOCKED else real_find_spec(name, *args)
importlib.util.find_spec = find_spec

import torch
from transformers import LlamaConfig, LlamaForCausalLM
import peftlab
from peftlab import LoraConfig, get_peft_model
import peftlab.core.checkpoint, peftlab.core.combination, peftlab.methods
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2))
model(input_ids=torch.tensor([[1, 2, 3]]))
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "an application package was imported"

from peftlab.compare.plots import write_plots
try:
    write_plots({{}}, None)
except RuntimeError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pip install 'peftlab[compare]'" in done.stdout
