"""The ``peftlab`` command line: a thin dispatcher over one module per sub-command.

Each sub-command is a module in ``peftlab.cli`` exposing ``register(subparsers)``, which adds
its parser and sets ``func`` (taking the parsed args, returning an exit code). The modules only
parse arguments; the work is done by the library and the applications they call.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# one line per sub-command module
COMMANDS: tuple[str, ...] = ("compare", "count", "demo", "merge", "recommend", "serve", "train")


def build_parser() -> argparse.ArgumentParser:
    from peftlab import __version__

    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning: LoRA, bottleneck adapters, prefix tuning, IA3.",
    )
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"peftlab.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command, for results that record how they were made
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        if getattr(args, "verbose", False):
            raise
        print(f"peftlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
