"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is first written to a temporary sibling (same folder, hence same filesystem) named
``.<final name>.<random>.tmp``, fsynced, then renamed into place with ``os.replace`` and the
parent folder fsynced, so the rename is durable too. A crash leaves at most such a temporary
sibling, which :func:`remove_temps` sweeps away. Adapter checkpoints, training checkpoints,
cached data and models, merged models and reports are all written through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    if os.name == "nt" and path.is_dir():  # folders cannot be opened for fsync there; rename is atomic
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def temp_sibling(final: Path) -> Path:
    """A fresh temporary name next to ``final``."""
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def temps_of(folder: Path, final_name: str) -> list[Path]:
    """Temporary siblings a write of ``folder/final_name`` (a glob pattern is allowed) left behind."""
    return sorted(folder.glob(f".{final_name}.*{TEMP_SUFFIX}"))


def remove_temps(folder: Path, final_name: str) -> None:
    for tmp in temps_of(folder, final_name):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def stage_file(final: Path, write: Callable[[Path], object]) -> Path:
    """Write a complete, fsynced temporary sibling of ``final`` with ``write(path)``; returns it.

    The caller renames it into place with :func:`commit` (or several files in an order of its
    choosing); on failure nothing is left behind.
    """
    tmp = temp_sibling(final)
    # O_EXCL: never reuse a name; mode 0o666 lets the umask decide, as for a normal file
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, final: Path) -> None:
    """Rename a staged file or folder into place and make the rename durable."""
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_file(final: str | os.PathLike[str], data: bytes | str | Callable[[Path], object]) -> Path:
    """Write ``final`` atomically: ``data`` as bytes or UTF-8 text, or ``data(path)`` writing it."""
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        text = data
        data = lambda p: p.write_text(text, encoding="utf-8")  # noqa: E731
    elif isinstance(data, bytes):
        raw = data
        data = lambda p: p.write_bytes(raw)  # noqa: E731
    commit(stage_file(target, data), target)
    return target


def write_json(final: str | os.PathLike[str], value: Any, *, compact: bool = False) -> Path:
    """``value`` as JSON (sorted keys; indented unless ``compact``), written atomically."""
    if compact:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    else:
        text = json.dumps(value, indent=1, sort_keys=True, default=str)
    return write_file(final, text + "\n")


@contextlib.contextmanager
def folder(final: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block succeeds, fsync it and rename it to
    ``final``. An existing ``final`` is an error unless ``replace``, in which case it is swapped
    out and removed only after the new folder is in place. On failure the temporary folder goes."""
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists already")
            old = temp_sibling(target)
            os.replace(target, old)
            commit(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
