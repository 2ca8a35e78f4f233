"""Optional packages: a feature whose extra is missing fails with one line naming the install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.extras import MissingExtra, require


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(MissingExtra, match=r"plots needs the 'matplotlib' package, which is not installed: "
                       r"pip install 'peftlab\[compare\]' \(or pip install matplotlib\)"):  # fmt: skip
        require("matplotlib", "plots")
    assert require("yaml", "YAML run files").__name__ == "yaml"


def test_a_command_without_its_extra_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text("method: lora\ntask: topic\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert main(["train", "--config", str(run_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'peftlab[train]'" in err[0] and str(run_file) in err[0]


def test_each_hint_names_an_extra_that_installs_the_package() -> None:
    """The extra a missing-package error names (PACKAGES) really holds that package."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from peftlab.extras import PACKAGES

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
        import tomli as tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for module, (package, extra) in PACKAGES.items():
        names = {canonicalize_name(Requirement(r).name) for r in extras[extra]}
        assert canonicalize_name(package) in names, (module, extra)
