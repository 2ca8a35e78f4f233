"""The heap allocator of the ``peftlab`` command: PEFTLAB_ALLOCATOR is resolved to a library
(or the system's), a bad setting is a one-line error naming the fix, the process is started
again once with the library preloaded (same arguments), and the real command does so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab import allocator

JEMALLOC = allocator.find("jemalloc")


def _fake_lib(tmp_path: Path, name: str = "libjemalloc.so.2") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\x7fELF")
    return path


def test_resolve_settings(tmp_path: Path) -> None:
    lib = _fake_lib(tmp_path)
    assert allocator.resolve("system", [tmp_path]) is None
    assert allocator.resolve("auto", [tmp_path]) == lib
    assert allocator.resolve("", [tmp_path]) == lib  # empty = auto
    assert allocator.resolve("jemalloc", [tmp_path]) == lib
    assert allocator.resolve("auto", [tmp_path / "none"]) is None  # nothing installed: the system's
    assert allocator.resolve(str(lib), []) == lib


def test_resolve_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_lib(tmp_path)
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.resolve(None, [tmp_path]) is None
    monkeypatch.delenv(allocator.ENV)
    assert allocator.resolve(None, [tmp_path]) == tmp_path / "libjemalloc.so.2"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "tcmalloc",
            "no tcmalloc library found .*apt install libtcmalloc-minimal4.*PEFTLAB_ALLOCATOR=system",
        ),
        ("jemalloc", "no jemalloc library found .*apt install libjemalloc2"),
        ("mimalloc", "unknown setting; use one of auto, system, jemalloc, tcmalloc"),
        ("/no/such/lib.so", "no such file"),
    ],
)
def test_bad_settings_name_the_fix(tmp_path: Path, setting: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"PEFTLAB_ALLOCATOR={setting}: {message}"):
        allocator.resolve(setting, [tmp_path])


def test_search_dirs_start_with_the_active_environment() -> None:
    dirs = allocator.search_dirs({"VIRTUAL_ENV": "/venv", "CONDA_PREFIX": "/conda"})
    assert dirs[:2] == [Path("/venv/lib"), Path("/conda/lib")]
    assert Path("/usr/lib") in dirs and len(dirs) == len(set(dirs))


def test_loaded_reads_the_mappings() -> None:
    maps = "7f00-7f10 r-xp 0 fe:00 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert allocator.loaded(maps) == "jemalloc"
    assert allocator.loaded("7f00 /usr/lib/libtcmalloc_minimal.so.4\n") == "tcmalloc"
    assert allocator.loaded("7f00 /usr/lib/x86_64-linux-gnu/libc.so.6\n") is None


def test_preload_environ_puts_the_library_first_once() -> None:
    lib = Path("/usr/lib/libjemalloc.so.2")
    env = allocator.preload_environ(lib, {"LD_PRELOAD": f"/opt/other.so:{lib}", "HOME": "/root"})
    assert env["LD_PRELOAD"] == f"{lib} /opt/other.so"
    assert env[allocator.REEXEC_ENV] == str(lib) and env["HOME"] == "/root"


class _Exec(Exception):
    pass


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))
        raise _Exec

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(allocator, "search_dirs", lambda environ=None: [tmp_path])
    monkeypatch.setattr(allocator, "loaded", lambda maps=None: None)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "peftlab", "train", "--steps", "3"])
    monkeypatch.delenv(allocator.REEXEC_ENV, raising=False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    return calls


def test_ensure_starts_the_process_again_with_the_library(
    execs: list[tuple[str, list[str], dict[str, str]]], tmp_path: Path
) -> None:
    lib = _fake_lib(tmp_path)
    with pytest.raises(_Exec):
        allocator.ensure()
    ((path, argv, env),) = execs
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "peftlab", "train", "--steps", "3"]  # same arguments
    assert env["LD_PRELOAD"].split()[0] == str(lib) and env[allocator.REEXEC_ENV] == str(lib)


def test_ensure_does_nothing_when_not_wanted_or_done(
    execs: list[tuple[str, list[str], dict[str, str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocator.ensure()  # no library installed: the system allocator, no restart
    _fake_lib(tmp_path)
    allocator.ensure("system")
    monkeypatch.setenv(allocator.REEXEC_ENV, "/x/libjemalloc.so.2")
    allocator.ensure()  # already started again once (even if the loader refused the preload)
    monkeypatch.delenv(allocator.REEXEC_ENV)
    monkeypatch.setattr(allocator, "loaded", lambda maps=None: "jemalloc")
    allocator.ensure()  # already in place
    assert execs == []
    with pytest.raises(ValueError, match="unknown setting"):
        allocator.ensure("nonsense")


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    drop = ("LD_PRELOAD", allocator.REEXEC_ENV, allocator.ENV)
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120
    )


_PROBE = (
    "import peftlab_entry as e; e._allocator_module().ensure(); "
    "from peftlab import allocator as a; import sys; print(a.loaded(), sys.argv[1:])"
)


@pytest.mark.skipif(JEMALLOC is None or not sys.platform.startswith("linux"), reason="jemalloc not installed")
def test_the_command_runs_under_jemalloc_when_installed() -> None:
    done = _run(_PROBE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "jemalloc []"
    done = _run(_PROBE, PEFTLAB_ALLOCATOR="system")
    assert done.stdout.strip() == "None []"


def test_the_command_refuses_a_bad_setting_in_one_line() -> None:
    script = Path(sys.executable).parent / "peftlab"
    if not script.is_file():
        pytest.skip("the peftlab console script is not installed next to this Python")
    clean = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    done = subprocess.run(
        [str(script), "count", "--help"],
        capture_output=True,
        text=True,
        env={**clean, allocator.ENV: "mimalloc"},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "peftlab: error: PEFTLAB_ALLOCATOR=mimalloc: unknown setting; use one of auto, system, jemalloc, "
        "tcmalloc, or a library's path"
    ]
