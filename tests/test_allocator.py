"""The heap allocator of the ``peftlab`` command: PEFTLAB_ALLOCATOR is resolved to a library
(or glibc's malloc, tuned or as it comes), a bad setting is a one-line error naming the fix, the
process is started again once with the library preloaded or glibc's tunables set (same
arguments), ``system`` leaves glibc untouched, and the real command does so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab import allocator

JEMALLOC = allocator.find("jemalloc")
GLIBC = allocator.tunable_glibc()
TUNABLES = ":".join(f"{k}={v}" for k, v in allocator.GLIBC_TUNABLES.items())


def _fake_lib(tmp_path: Path, name: str = "libjemalloc.so.2") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\x7fELF")
    return path


def test_resolve_settings(tmp_path: Path) -> None:
    lib = _fake_lib(tmp_path)
    assert allocator.resolve("system", [tmp_path]) is None
    assert allocator.resolve("glibc-tuned", [tmp_path]) is None  # glibc's own malloc, tuned
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
        ("mimalloc", "no mimalloc library found .*pip install cmeel-mimalloc"),
        ("hoard", "unknown setting; use one of auto, system, glibc-tuned, jemalloc, mimalloc, tcmalloc"),
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
    assert allocator.loaded("7f00 /venv/lib/cmeel.prefix/lib/libmimalloc.so.3\n") == "mimalloc"


@pytest.mark.skipif(not GLIBC, reason="glibc tunables: Linux with glibc only")
def test_loaded_names_tuned_glibc_from_the_environment() -> None:
    libc = "7f00 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert allocator.loaded(libc, {allocator.TUNABLES_ENV: TUNABLES}) == "glibc-tuned"
    assert allocator.loaded(libc, {allocator.TUNABLES_ENV: f"glibc.malloc.tcache_count=0:{TUNABLES}"}) == (
        "glibc-tuned"
    )
    assert allocator.loaded(libc, {}) is None  # glibc as it comes
    assert allocator.loaded(libc) is None  # maps alone: libraries only
    lib = "7f00 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert allocator.loaded(lib, {allocator.TUNABLES_ENV: TUNABLES}) == "jemalloc"  # the preload wins


def test_tuned_environ_sets_the_tunables_and_keeps_others() -> None:
    env = allocator.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "HOME": "/root"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{TUNABLES}"
    assert env[allocator.REEXEC_ENV] == "glibc-tuned" and env["HOME"] == "/root"
    assert allocator.untuned_environ(env)["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0"
    assert "GLIBC_TUNABLES" not in allocator.untuned_environ(allocator.tuned_environ({}))
    # a value of ours the user set differently is replaced
    name = next(iter(allocator.GLIBC_TUNABLES))
    assert allocator.tuned_environ({"GLIBC_TUNABLES": f"{name}=999"})["GLIBC_TUNABLES"] == TUNABLES


def test_tuning_is_glibc_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(allocator, "glibc_version", lambda: None)  # musl, or not Linux
    assert not allocator.wants_tuning("glibc-tuned", [tmp_path])
    assert allocator.chosen("glibc-tuned", [tmp_path]) == "system"
    assert allocator.loaded("", {allocator.TUNABLES_ENV: TUNABLES}) is None
    monkeypatch.setattr(allocator, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(sys, "platform", "linux")
    assert allocator.wants_tuning("glibc-tuned", [tmp_path])
    assert allocator.chosen("glibc-tuned", [tmp_path]) == "glibc-tuned"
    assert not allocator.wants_tuning("system", [tmp_path]) and not allocator.wants_tuning("auto", [tmp_path])
    assert allocator.chosen("auto", [tmp_path]) == "system"  # opt-in only: tuning costs step time
    assert allocator.chosen("system", [tmp_path]) == "system"
    lib = _fake_lib(tmp_path)
    assert allocator.chosen("auto", [tmp_path]) == "jemalloc" and allocator.resolve("auto", [tmp_path]) == lib
    monkeypatch.setattr(allocator, "glibc_version", lambda: (2, 17))  # before tunables (2.26)
    assert not allocator.wants_tuning("glibc-tuned", [tmp_path / "none"])


def test_auto_picks_jemalloc_and_mimalloc_only_on_request(tmp_path: Path) -> None:
    mi = _fake_lib(tmp_path, "libmimalloc.so.3")
    assert allocator.resolve("auto", [tmp_path]) is None  # slower steps: not picked by auto
    assert allocator.resolve("mimalloc", [tmp_path]) == mi
    je = _fake_lib(tmp_path)
    assert allocator.resolve("auto", [tmp_path]) == je


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
    monkeypatch.setattr(allocator, "loaded", lambda maps=None, environ=None: None)
    monkeypatch.setattr(allocator, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(sys, "platform", "linux")
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
    allocator.ensure("system")  # no library installed, glibc untouched: no restart
    _fake_lib(tmp_path)
    allocator.ensure("system")
    monkeypatch.setenv(allocator.REEXEC_ENV, "/x/libjemalloc.so.2")
    allocator.ensure()  # already started again once (even if the loader refused the preload)
    monkeypatch.delenv(allocator.REEXEC_ENV)
    monkeypatch.setattr(allocator, "loaded", lambda maps=None, environ=None: "jemalloc")
    allocator.ensure()  # already in place
    assert execs == []
    with pytest.raises(ValueError, match="unknown setting"):
        allocator.ensure("nonsense")


def test_ensure_tunes_glibc_on_request(
    execs: list[tuple[str, list[str], dict[str, str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    allocator.ensure()  # auto, nothing installed: glibc as it comes, no restart
    with pytest.raises(_Exec):
        allocator.ensure("glibc-tuned")
    monkeypatch.setenv(allocator.ENV, "glibc-tuned")
    with pytest.raises(_Exec):
        allocator.ensure()
    assert len(execs) == 2
    for path, argv, env in execs:
        assert path == sys.executable and argv[1:] == ["-m", "peftlab", "train", "--steps", "3"]
        assert env["GLIBC_TUNABLES"] == TUNABLES and env[allocator.REEXEC_ENV] == "glibc-tuned"
        assert "LD_PRELOAD" not in env or allocator.loaded(env["LD_PRELOAD"]) is None
    monkeypatch.setattr(allocator, "loaded", lambda maps=None, environ=None: "glibc-tuned")
    allocator.ensure()  # already started with the tunables
    monkeypatch.setattr(allocator, "glibc_version", lambda: None)
    monkeypatch.setattr(allocator, "loaded", lambda maps=None, environ=None: None)
    allocator.ensure("glibc-tuned")  # musl: nothing to tune, no restart
    assert len(execs) == 2


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    drop = ("LD_PRELOAD", allocator.REEXEC_ENV, allocator.ENV, allocator.TUNABLES_ENV)
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120
    )


_PROBE = (
    "import peftlab_entry as e; e._allocator_module().ensure(); "
    "from peftlab import allocator as a; import sys; print(a.loaded(), sys.argv[1:])"
)
_TUNED_PROBE = (
    "import peftlab_entry as e; e._allocator_module().ensure(); import os; "
    "from peftlab import allocator as a; print(a.loaded(), os.environ.get('GLIBC_TUNABLES'))"
)


@pytest.mark.skipif(not GLIBC, reason="glibc tunables: Linux with glibc only")
def test_the_command_tunes_glibc_on_request_and_system_leaves_it() -> None:
    done = _run(_TUNED_PROBE, PEFTLAB_ALLOCATOR="glibc-tuned")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["glibc-tuned", TUNABLES]  # started again with the tunables
    done = _run(_TUNED_PROBE, PEFTLAB_ALLOCATOR="system")
    assert done.stdout.split() == ["None", "None"]  # no restart, no tunables
    if JEMALLOC is None:
        done = _run(_TUNED_PROBE)  # auto without jemalloc: glibc as it comes
        assert done.stdout.split() == ["None", "None"]


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
        env={**clean, allocator.ENV: "hoard"},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "peftlab: error: PEFTLAB_ALLOCATOR=hoard: unknown setting; use one of auto, system, glibc-tuned, "
        "jemalloc, mimalloc, tcmalloc, or a library's path"
    ]
