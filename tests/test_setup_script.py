"""``./run setup``'s jemalloc step (``install_jemalloc`` in ``run``): Debian's ``libjemalloc2``,
fetched with ``apt-get download``, checked against the pinned sha256, unpacked and copied into
``.venv/lib`` only when it loads; every other outcome is one line naming why, and never fails the
setup. apt-get, dpkg and dpkg-deb are stand-ins on ``PATH`` (nothing is downloaded); the
"library" they unpack is a real shared library under jemalloc's name, so the load check is real.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "run"
DEB_BYTES = b"stand-in for libjemalloc2_5.3.0-1_amd64.deb"
LIB_IN_DEB = "usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("bash") is None, reason="./run's setup: Linux, bash"
)


def _a_shared_library() -> Path:
    """A real shared library to stand in for jemalloc (loading it under another name is harmless)."""
    maps = Path("/proc/self/maps").read_text()
    for line in maps.splitlines():
        path = line.split()[-1]
        if "/libm.so" in path or "/libz.so" in path:
            return Path(path)
    pytest.skip("no libm/libz mapped in this process to stand in for jemalloc")


def _fake_tools(bin_dir: Path, *, arch: str = "amd64", download_ok: bool = True, library: Path) -> None:
    bin_dir.mkdir()
    tools = {
        "dpkg": f'[ "$1" = --print-architecture ] && echo {arch}',
        "apt-get": (
            f'echo "$@" >> "{bin_dir}/apt-get.calls"\n'
            + (
                f"printf '%s' '{DEB_BYTES.decode()}' > libjemalloc2_5.3.0-1_amd64.deb"
                if download_ok
                else "exit 100"
            )
        ),
        # dpkg-deb -x DEB DIR: "unpacks" the real shared library as jemalloc
        "dpkg-deb": f'mkdir -p "$3/{Path(LIB_IN_DEB).parent}" && cp "{library}" "$3/{LIB_IN_DEB}"',
    }
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


def _install(
    tmp_path: Path, *, sha256: str | None = None, system_dirs: str = "", **tools: object
) -> tuple[Path, str]:
    venv = tmp_path / "venv"
    (venv / "lib").mkdir(parents=True, exist_ok=True)
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        _fake_tools(bin_dir, library=_a_shared_library(), **tools)  # type: ignore[arg-type]
    pin = hashlib.sha256(DEB_BYTES).hexdigest() if sha256 is None else sha256
    script = (
        f'source "{RUN}"; VENV="{venv}"; PY="{sys.executable}"; JEMALLOC_SHA256="{pin}"; '
        f'JEMALLOC_SYSTEM_DIRS="{system_dirs}"; install_jemalloc'
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("LD_PRELOAD", None)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr  # never fails the setup
    return venv / "lib" / "libjemalloc.so.2", done.stderr


def test_installs_the_pinned_package_into_the_venv(tmp_path: Path) -> None:
    lib, said = _install(tmp_path)
    assert lib.is_file() and lib.read_bytes() == _a_shared_library().read_bytes()
    venv_lib = tmp_path / "venv" / "lib"
    assert (
        said.strip()
        == f"run: jemalloc (libjemalloc2=5.3.0-1, from Debian's archive) installed into {venv_lib}"
    )
    assert "download" in (tmp_path / "bin" / "apt-get.calls").read_text()
    assert "libjemalloc2=5.3.0-1" in (tmp_path / "bin" / "apt-get.calls").read_text()  # the pinned version
    # once there, a second setup does nothing (no download, nothing said)
    (tmp_path / "bin" / "apt-get.calls").unlink()
    lib2, said2 = _install(tmp_path)
    assert lib2.is_file() and said2 == "" and not (tmp_path / "bin" / "apt-get.calls").exists()


def test_a_package_with_another_hash_is_not_installed(tmp_path: Path) -> None:
    lib, said = _install(tmp_path, sha256="0" * 64)
    assert not lib.exists() and not list(lib.parent.iterdir())  # nothing half-copied either
    assert said.startswith(
        "run: jemalloc not installed: the downloaded package's sha256 is not the pinned one;"
    )
    assert len(said.strip().splitlines()) == 1 and "apt install libjemalloc2" in said


@pytest.mark.parametrize(
    ("tools", "why"),
    [
        ({"download_ok": False}, "'apt-get download libjemalloc2=5.3.0-1' failed"),
        ({"arch": "arm64"}, "libjemalloc2=5.3.0-1 is pinned for amd64, this is arm64"),
    ],
)
def test_what_it_could_not_do_is_one_line(tmp_path: Path, tools: dict[str, object], why: str) -> None:
    lib, said = _install(tmp_path, **tools)
    assert not lib.exists()
    assert said.startswith(f"run: jemalloc not installed: {why}") and len(said.strip().splitlines()) == 1


def test_a_system_jemalloc_is_left_to_peftlab_silently(tmp_path: Path) -> None:
    system = tmp_path / "system-lib"
    system.mkdir()
    (system / "libjemalloc.so.2").write_bytes(b"")
    lib, said = _install(tmp_path, system_dirs=str(system), download_ok=False)
    assert not lib.exists() and said == ""  # peftlab's allocator finds the system's


def test_the_installed_library_is_what_peftlab_preloads(tmp_path: Path) -> None:
    lib, _ = _install(tmp_path)
    from peftlab import allocator

    assert allocator.find("jemalloc", [lib.parent]) == lib
    assert allocator.resolve("auto", [lib.parent]) == lib
