"""The ``peftlab`` console command: picks the heap allocator, then runs :func:`peftlab.cli.main`.

A separate top-level module because an allocator has to be preloaded before the process
allocates much: importing anything under ``peftlab`` first runs the package's ``__init__``,
which imports torch and transformers (2-3 s, hundreds of MiB). So the allocator module (standard
library only) is loaded here from its file, and the package is imported only after the process
was started again under the allocator (see :mod:`peftlab.allocator`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _allocator_module() -> ModuleType | None:
    spec = importlib.util.find_spec("peftlab")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "allocator.py"
    file_spec = importlib.util.spec_from_file_location("_peftlab_allocator", path)
    if file_spec is None or file_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def main() -> int:
    allocator = _allocator_module()
    if allocator is not None:
        try:
            allocator.ensure()
        except ValueError as err:
            print(f"peftlab: error: {err}", file=sys.stderr)
            return 2
    from peftlab.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
