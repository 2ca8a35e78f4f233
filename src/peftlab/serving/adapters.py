"""Which adapter names and folders ``peftlab serve`` accepts, and where run-time loads may read.

Run-time loading (``POST /v1/adapters``) is off unless the server was given adapter roots
(``--adapter-dir DIR``, repeatable). With roots, a requested path is resolved (symlinks
followed, ``..`` collapsed) and must lie inside one of them, and so must the files read from
it; anything else is refused with 403 before the disk is looked at any further, so a client
learns nothing about folders outside the roots. A relative path is taken inside each root in
turn. Folders given on the command line (``--adapter NAME=PATH``) are the operator's choice
and are not confined. With ``--max-loaded-adapters``, a request naming an adapter that is not
loaded loads the folder of that name in a root (:func:`on_disk`, then the same confinement).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn

from peftlab.serving.jobs import ServeError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def check_adapter_name(name: str, base_name: str) -> None:
    """Names appear in URLs and in ``model`` fields: letters, digits, ``_`` and ``-`` only."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise ServeError(
            400,
            f"adapter name {name!r} is not usable: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit",
            param="name",
        )
    if name == base_name:
        raise ServeError(400, f"adapter name {name!r} is the base model's name; pick another", param="name")
    if hasattr(nn.ModuleDict, name):
        raise ServeError(
            400, f"adapter name {name!r} is the name of a torch.nn.Module method; pick another", param="name"
        )


# POSIX's usual limits (Linux: PATH_MAX 4096, NAME_MAX 255 bytes): a longer path is refused as
# bad input before the file system is asked (which would raise "File name too long")
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


def check_path_length(path: str) -> None:
    """400 for a path no file system here can hold (too long, or a part too long)."""
    encoded = os.fsencode(path)
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise ServeError(
            400,
            f"adapter path of {len(encoded):,} bytes (longest part {longest:,}) is too long: paths take at "
            f"most {MAX_PATH_BYTES} bytes and {MAX_NAME_BYTES} per folder name",
            param="path",
        )


def check_adapter_folder(path: str | os.PathLike[str]) -> Path:
    """A local folder saved by ``save_pretrained``: ``adapter_config.json`` + safetensors weights."""
    shown = str(path)
    check_path_length(shown)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ServeError(400, f"adapter path {shown!r} does not exist on the server", param="path")
    if not folder.is_dir():
        raise ServeError(
            400, f"adapter path {shown!r} is a file; give the folder that holds {CONFIG_FILE}", param="path"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise ServeError(
            400,
            f"{shown!r} is not a PEFT adapter folder: it has no {CONFIG_FILE} (save adapters with "
            "model.save_pretrained(folder))",
            param="path",
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise ServeError(
            400,
            f"{shown!r} has no {WEIGHTS_FILE}; the server loads adapter weights only from safetensors "
            "(re-save a pickled adapter_model.bin with save_pretrained)",
            param="path",
        )
    return folder.resolve()


def check_adapter_limit(
    limit: int | None, named: Sequence[str], roots: Sequence[str | os.PathLike[str]]
) -> None:
    """A one-line ValueError for a ``--max-loaded-adapters`` that cannot work: below 1, without
    ``--adapter-dir`` roots to load from, or below the count of adapters named at start-up."""
    if limit is None:
        return
    if limit < 1:
        raise ValueError(f"--max-loaded-adapters must be at least 1, got {limit}")
    if not roots:
        raise ValueError(
            "--max-loaded-adapters loads adapters on demand from the --adapter-dir folders; give "
            "--adapter-dir DIR too"
        )
    if len(named) > limit:
        raise ValueError(
            f"--max-loaded-adapters {limit} is smaller than the {len(named)} adapters named at start-up "
            f"({', '.join(named)}); raise it to at least {len(named)} or name fewer adapters"
        )


def on_disk(roots: Sequence[Path], name: str) -> bool:
    """Whether ``name`` (a valid adapter name) is an entry of a root: what a request may load on
    demand. Links are not followed here, so nothing outside the roots is looked at."""
    return bool(ADAPTER_NAME.match(name)) and any(os.path.lexists(root / name) for root in roots)


class AdapterRoots:
    """The folders run-time adapter loads may read from (none: run-time loading is off)."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]] = ()) -> None:
        resolved = []
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise ValueError(f"--adapter-dir {str(root)!r} is not a folder on this machine")
            resolved.append(path.resolve())
        self.roots: tuple[Path, ...] = tuple(dict.fromkeys(resolved))

    @property
    def enabled(self) -> bool:
        return bool(self.roots)

    def require_enabled(self, what: str) -> None:
        if not self.roots:
            raise ServeError(
                403,
                f"{what} at run time is off on this server; the adapters are fixed at startup "
                "(start peftlab serve with --adapter-dir DIR to allow loading folders inside DIR)",
                kind="permission_error",
            )

    def inside(self, path: Path) -> Path | None:
        """The root ``path`` (already resolved) lies in, or None."""
        return next((root for root in self.roots if path == root or path.is_relative_to(root)), None)

    def confine(self, requested: str) -> Path:
        """The resolved adapter folder for ``requested``; 403 when it lies outside every root
        (or a file in it leads outside), 400 when it is not an adapter folder."""
        self.require_enabled("loading adapters")
        if not isinstance(requested, str) or not requested or "\0" in requested:
            raise ServeError(400, "path must be a non-empty folder path", param="path")
        check_path_length(requested)
        given = Path(requested)
        candidates: Sequence[Path] = [given] if given.is_absolute() else [root / given for root in self.roots]
        inside: list[Path] = []
        for candidate in candidates:
            resolved = candidate.resolve()
            if self.inside(resolved) is not None:
                inside.append(resolved)
        if not inside:
            raise ServeError(
                403,
                f"adapter path {requested!r} is outside the folders this server loads adapters from "
                f"({', '.join(str(r) for r in self.roots)}); give a folder inside one of them, or a path "
                "relative to one",
                kind="permission_error",
                param="path",
            )
        folder = next((p for p in inside if p.exists()), inside[0])
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            file = folder / name
            if file.exists() and self.inside(file.resolve()) is None:
                raise ServeError(
                    403,
                    f"{requested!r}: {name} is a link to a file outside the adapter folders; copy the file "
                    "into the folder instead",
                    kind="permission_error",
                    param="path",
                )
        return check_adapter_folder(folder)
