"""The heap allocator the ``peftlab`` command runs under (Linux).

Training on a CPU frees and re-allocates the same 1-3 MiB activation blocks at every step.
glibc's malloc moves such blocks from ``mmap`` onto its heap once the first ones are freed
(its dynamic mmap threshold) and keeps the freed space resident, so a LoRA step on SmolLM2-135M
peaks ~300 MiB above what it holds live; jemalloc returns that space and is no slower
(``benchmarks/train_memory.py``, figures in ``benchmarks/RESULTS.md``). PyTorch's own CPU
launcher (``python -m torch.backends.xeon.run_cpu``) preloads jemalloc or tcmalloc for the same
reasons.

An allocator has to be in place before the process starts, so the ``peftlab`` command, before it
imports anything heavy, looks for jemalloc and, if it finds it and it is not loaded yet, runs
itself again with the library in ``LD_PRELOAD`` (same process id, same arguments; children
such as compare's workers inherit it). ``PEFTLAB_ALLOCATOR`` says what to use:

- ``auto`` (the default): jemalloc if its library is found, else the system allocator;
- ``system``: the C library's malloc, nothing preloaded;
- ``jemalloc`` or ``tcmalloc``: that one, an error if it is not installed;
- a path to a shared library: that file.

Python code that trains in its own process gets the same by starting Python with
``LD_PRELOAD`` set to :func:`find` ``("jemalloc")``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV = "PEFTLAB_ALLOCATOR"
# set in the environment of the process that was started again, so that a preload the dynamic
# loader refused (it prints a line and goes on without it) cannot cause a loop
REEXEC_ENV = "PEFTLAB_ALLOCATOR_PRELOADED"
SETTINGS = ("auto", "system", "jemalloc", "tcmalloc")
# the shared-library names each allocator installs under (Debian/Ubuntu, Fedora, conda, pip venvs)
LIBRARY_NAMES: dict[str, tuple[str, ...]] = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc.so.4", "libtcmalloc_minimal.so.4", "libtcmalloc.so", "libtcmalloc_minimal.so"),
}
INSTALL_HINT: dict[str, str] = {
    "jemalloc": "apt install libjemalloc2 (Debian/Ubuntu), dnf install jemalloc, "
    "or conda install -c conda-forge jemalloc",
    "tcmalloc": "apt install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install gperftools-libs, "
    "or conda install -c conda-forge gperftools",
}


def search_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where :func:`find` looks, in order: the active environment's ``lib``, then the system's."""
    env = os.environ if environ is None else environ
    dirs = [Path(env[k]) / "lib" for k in ("VIRTUAL_ENV", "CONDA_PREFIX") if env.get(k)]
    dirs.append(Path(sys.prefix) / "lib")
    machine = os.uname().machine if hasattr(os, "uname") else ""
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        if machine:
            dirs.append(Path(root) / f"{machine}-linux-gnu")
        dirs.append(Path(root))
    dirs += [Path("/usr/lib64"), Path("/lib64")]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find(name: str, dirs: Sequence[Path] | None = None) -> Path | None:
    """The first installed shared library of allocator ``name`` (``jemalloc`` or ``tcmalloc``)."""
    for directory in search_dirs() if dirs is None else dirs:
        for filename in LIBRARY_NAMES[name]:
            candidate = directory / filename
            if candidate.is_file():
                return candidate
    return None


def resolve(setting: str | None = None, dirs: Sequence[Path] | None = None) -> Path | None:
    """The library a setting of ``PEFTLAB_ALLOCATOR`` asks for; ``None`` means the system allocator.

    Raises ``ValueError`` for an unknown setting, or a named allocator that is not installed.
    """
    value = (os.environ.get(ENV, "auto") if setting is None else setting).strip() or "auto"
    if value == "system":
        return None
    if value == "auto":
        return find("jemalloc", dirs)
    if value in LIBRARY_NAMES:
        found = find(value, dirs)
        if found is None:
            raise ValueError(
                f"{ENV}={value}: no {value} library found (looked for {', '.join(LIBRARY_NAMES[value])} "
                f"in {', '.join(str(d) for d in (search_dirs() if dirs is None else dirs))}); install it "
                f"({INSTALL_HINT[value]}) or set {ENV}=auto or {ENV}=system"
            )
        return found
    if "/" in value:
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{ENV}={value}: no such file; give a shared library's path, or auto or system")
        return path
    raise ValueError(f"{ENV}={value}: unknown setting; use one of {', '.join(SETTINGS)}, or a library's path")


def loaded(maps: str | None = None) -> str | None:
    """The allocator preloaded into this process (``jemalloc`` / ``tcmalloc``), from /proc/self/maps."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    for name in LIBRARY_NAMES:
        if f"/lib{name}" in maps:
            return name
    return None


def preload_environ(library: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` with ``library`` first in ``LD_PRELOAD`` and the re-run marker set."""
    env = dict(os.environ if environ is None else environ)
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != str(library)]
    env["LD_PRELOAD"] = " ".join([str(library), *others])
    env[REEXEC_ENV] = str(library)
    return env


def restart_command() -> list[str]:
    """The command line that started this interpreter (``sys.orig_argv``: flags, ``-m``, script)."""
    return [sys.executable, *sys.orig_argv[1:]]


def ensure(setting: str | None = None) -> None:
    """Run this process again under the allocator ``PEFTLAB_ALLOCATOR`` asks for, if it is not in place.

    Returns (does nothing) on systems other than Linux, when the system allocator is asked for or
    no jemalloc is installed (``auto``), when the allocator is already loaded, and after one
    restart. Otherwise it replaces the process (``os.execve``) and does not return. Raises
    ``ValueError`` for a bad setting (see :func:`resolve`).
    """
    if not sys.platform.startswith("linux"):
        return
    library = resolve(setting)
    if library is None or os.environ.get(REEXEC_ENV) or loaded() is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, restart_command(), preload_environ(library))
