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

- ``auto`` (the default): jemalloc if its library is found (first in the active environment's
  ``lib``, where ``./run setup`` puts Debian's ``libjemalloc2``, pinned and hash-checked; then
  the system's), else the system allocator;
- ``system``: the C library's malloc as it comes, nothing preloaded, nothing tuned;
- ``glibc-tuned``: glibc's malloc with the tunables in :data:`GLIBC_TUNABLES`, a fixed 1 MiB
  mmap threshold (``GLIBC_TUNABLES`` is read by the C library when a process starts, so it is
  set and the process started again); a no-op on other C libraries (musl) and systems (macOS).
  Less memory (LoRA's peak -15% on SmolLM2-135M) for slower steps (+17-30%): no glibc tuning
  measured matched jemalloc's memory without costing time (``benchmarks/RESULTS.md``, issue 29),
  so ``auto`` does not pick it;
- ``jemalloc``, ``mimalloc`` or ``tcmalloc``: that one, an error if it is not installed;
- a path to a shared library: that file.

:func:`loaded` names what a process runs under (``compare``'s ``results.json`` and ``train``'s
metrics record it). Python code that trains in its own process gets the same by starting Python
with ``LD_PRELOAD`` set to :func:`find` ``("jemalloc")``, or with :func:`tuned_environ`'s
``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV = "PEFTLAB_ALLOCATOR"
# set in the environment of the process that was started again, so that a preload the dynamic
# loader refused (it prints a line and goes on without it) cannot cause a loop
REEXEC_ENV = "PEFTLAB_ALLOCATOR_PRELOADED"
GLIBC_TUNED = "glibc-tuned"
SETTINGS = ("auto", "system", GLIBC_TUNED, "jemalloc", "mimalloc", "tcmalloc")
# what ``auto`` preloads when found, in this order (else the system allocator); mimalloc is not
# among them: its steps were 1.2-3x slower than glibc's here (benchmarks/RESULTS.md, issue 29)
AUTO_LIBRARIES = ("jemalloc",)
# the shared-library names each allocator installs under (Debian/Ubuntu, Fedora, conda, pip venvs)
LIBRARY_NAMES: dict[str, tuple[str, ...]] = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
    "tcmalloc": ("libtcmalloc.so.4", "libtcmalloc_minimal.so.4", "libtcmalloc.so", "libtcmalloc_minimal.so"),
}
INSTALL_HINT: dict[str, str] = {
    "jemalloc": "apt install libjemalloc2 (Debian/Ubuntu), dnf install jemalloc, "
    "or conda install -c conda-forge jemalloc",
    "mimalloc": "pip install cmeel-mimalloc (Linux x86_64 wheels), apt install libmimalloc2.0, "
    "or conda install -c conda-forge mimalloc",
    "tcmalloc": "apt install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install gperftools-libs, "
    "or conda install -c conda-forge gperftools",
}
# glibc's malloc as ``glibc-tuned`` runs it (names and meanings: the glibc manual, "Memory
# Allocation Tunables"); measured in benchmarks/train_memory.py, figures in benchmarks/RESULTS.md
GLIBC_TUNABLES: dict[str, str] = {
    # blocks of 1 MiB and more (activations) are mmapped and given back when freed, instead of
    # the dynamic threshold moving them onto the heap after the first step
    "glibc.malloc.mmap_threshold": "1048576",
}
TUNABLES_ENV = "GLIBC_TUNABLES"


def glibc_version() -> tuple[int, int] | None:
    """This process's glibc version, or ``None`` on another C library (musl) or system."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    try:
        major, minor = (int(part) for part in text.split()[1].split(".")[:2])
    except ValueError:
        return None
    return major, minor


def tunable_glibc() -> bool:
    """Whether ``GLIBC_TUNABLES`` works here: Linux with glibc 2.26 or newer."""
    version = glibc_version()
    return sys.platform.startswith("linux") and version is not None and version >= (2, 26)


def search_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where :func:`find` looks, in order: the active environment's ``lib`` (and the ``lib`` of
    the ``cmeel.prefix`` that pip wheels such as ``cmeel-mimalloc`` install into), then the
    system's."""
    env = os.environ if environ is None else environ
    dirs = [Path(env[k]) / "lib" for k in ("VIRTUAL_ENV", "CONDA_PREFIX") if env.get(k)]
    dirs.append(Path(sys.prefix) / "lib")
    dirs += [Path(sysconfig.get_path(k)) / "cmeel.prefix" / "lib" for k in ("platlib", "purelib")]
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
    """The first installed shared library of allocator ``name`` (a key of :data:`LIBRARY_NAMES`)."""
    for directory in search_dirs() if dirs is None else dirs:
        for filename in LIBRARY_NAMES[name]:
            candidate = directory / filename
            if candidate.is_file():
                return candidate
    return None


def _setting(setting: str | None) -> str:
    return (os.environ.get(ENV, "auto") if setting is None else setting).strip() or "auto"


def resolve(setting: str | None = None, dirs: Sequence[Path] | None = None) -> Path | None:
    """The library a setting of ``PEFTLAB_ALLOCATOR`` preloads; ``None`` means the C library's
    malloc (as it comes, or tuned: see :func:`wants_tuning`).

    Raises ``ValueError`` for an unknown setting, or a named allocator that is not installed.
    """
    value = _setting(setting)
    if value in ("system", GLIBC_TUNED):
        return None
    if value == "auto":
        for name in AUTO_LIBRARIES:
            found = find(name, dirs)
            if found is not None:
                return found
        return None
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


def wants_tuning(setting: str | None = None, dirs: Sequence[Path] | None = None) -> bool:
    """Whether the setting runs glibc's malloc with :data:`GLIBC_TUNABLES` (``glibc-tuned``), on a
    system where that works (:func:`tunable_glibc`)."""
    resolve(setting, dirs)  # a bad setting raises
    return _setting(setting) == GLIBC_TUNED and tunable_glibc()


def chosen(setting: str | None = None, dirs: Sequence[Path] | None = None) -> str:
    """What :func:`ensure` puts in place for a setting, as :func:`loaded` will name it."""
    library = resolve(setting, dirs)
    if library is not None:
        return loaded(str(library), {}) or library.name
    return GLIBC_TUNED if wants_tuning(setting, dirs) else "system"


def _parse_tunables(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split(":") if "=" in item)
    return {name: value for name, value in pairs}


def tuned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default: this process's, which glibc read its tunables from at start)
    sets every tunable of :data:`GLIBC_TUNABLES` to its value, on a glibc that reads them.

    (Not ``/proc/self/environ``: glibc cuts the ``GLIBC_TUNABLES`` it finds there at the first
    ``:`` while parsing it.)"""
    env = os.environ if environ is None else environ
    have = _parse_tunables(env.get(TUNABLES_ENV, ""))
    return (
        bool(GLIBC_TUNABLES) and tunable_glibc() and all(have.get(k) == v for k, v in GLIBC_TUNABLES.items())
    )


def loaded(maps: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The allocator this process runs under: ``jemalloc`` / ``mimalloc`` / ``tcmalloc`` when one
    is preloaded (from /proc/self/maps, or ``maps``), ``glibc-tuned`` when glibc's malloc runs
    with :data:`GLIBC_TUNABLES` (from this process's environment, or ``environ``),
    ``None`` for the C library's malloc as it comes. Given ``maps`` alone, only the libraries
    are looked for."""
    check_tuning = environ is not None or maps is None
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
        except OSError:
            maps = ""
    for name in LIBRARY_NAMES:
        if f"/lib{name}" in maps:
            return name
    if check_tuning and tuned(environ):
        return GLIBC_TUNED
    return None


def preload_environ(library: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` with ``library`` first in ``LD_PRELOAD`` and the re-run marker set."""
    env = dict(os.environ if environ is None else environ)
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != str(library)]
    env["LD_PRELOAD"] = " ".join([str(library), *others])
    env[REEXEC_ENV] = str(library)
    return env


def tuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` with :data:`GLIBC_TUNABLES` in ``GLIBC_TUNABLES`` (other tunables kept, ours
    replacing the same names) and the re-run marker set."""
    env = dict(os.environ if environ is None else environ)
    tunables = {**_parse_tunables(env.get(TUNABLES_ENV, "")), **GLIBC_TUNABLES}
    env[TUNABLES_ENV] = ":".join(f"{k}={v}" for k, v in tunables.items())
    env[REEXEC_ENV] = GLIBC_TUNED
    return env


def untuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` without the tunables of :data:`GLIBC_TUNABLES` (other tunables kept)."""
    env = dict(os.environ if environ is None else environ)
    rest = {k: v for k, v in _parse_tunables(env.pop(TUNABLES_ENV, "")).items() if k not in GLIBC_TUNABLES}
    if rest:
        env[TUNABLES_ENV] = ":".join(f"{k}={v}" for k, v in rest.items())
    return env


def restart_command() -> list[str]:
    """The command line that started this interpreter (``sys.orig_argv``: flags, ``-m``, script)."""
    return [sys.executable, *sys.orig_argv[1:]]


def ensure(setting: str | None = None) -> None:
    """Run this process again under the allocator ``PEFTLAB_ALLOCATOR`` asks for, if it is not in place.

    Returns (does nothing) on systems other than Linux, for ``system`` (and ``auto`` with no
    library found), when the allocator is already in place (library loaded, or glibc started with
    the tunables), for ``glibc-tuned`` on a C library other than glibc, and after one restart.
    Otherwise it replaces the process (``os.execve``) and does not return. Raises ``ValueError``
    for a bad setting (see :func:`resolve`).
    """
    if not sys.platform.startswith("linux"):
        return
    library = resolve(setting)
    if library is not None:
        if os.environ.get(REEXEC_ENV) or loaded(environ={}) is not None:  # a library loaded already
            return
        environ = preload_environ(library)
    elif wants_tuning(setting):
        if os.environ.get(REEXEC_ENV) or loaded() is not None:
            return
        environ = tuned_environ()
    else:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, restart_command(), environ)
