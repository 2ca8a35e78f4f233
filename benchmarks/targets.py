"""The verdict lines every benchmark prints, and its exit status.

One line per target, in a fixed form that a reader or a script can grep::

    PASS LoRA step / full step: 0.602 (target <= 0.70)
    MISS LoRA peak memory / full peak memory: 0.551 (target <= 0.50)
    SKIP LoRA peak memory / full peak memory: jemalloc is not installed here

The exit status tells a run that missed apart from one that broke: 0 when every target was met
or skipped, :data:`MISSED` (3) when one was missed; a crash exits 1 (an uncaught exception) and
a bad command line 2 (argparse), so a smoke run (``--quick``) can accept 0 and 3 alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSED = 3


@dataclass
class Targets:
    """Collects the verdicts of one run; :meth:`check` and :meth:`skip` print them as they come."""

    verdicts: list[dict[str, Any]] = field(default_factory=list)

    def check(self, name: str, value: float | str, ok: bool, rule: str) -> bool:
        """Record ``name`` as met (``ok``) or missed, with the measured ``value`` and the ``rule``
        it was held to (``"<= 0.90"``); a float value is printed with three decimals."""
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        result = "PASS" if ok else "MISS"
        print(f"{result} {name}: {shown} (target {rule})", flush=True)
        self.verdicts.append({"target": name, "value": value, "rule": rule, "result": result})
        return ok

    def at_most(self, name: str, value: float, limit: float, digits: int = 2) -> bool:
        """The common case: ``value <= limit``."""
        return self.check(name, value, value <= limit, f"<= {limit:.{digits}f}")

    def skip(self, name: str, why: str) -> None:
        """A target that does not apply to this run's configuration (no GPU, no jemalloc, ...)."""
        print(f"SKIP {name}: {why}", flush=True)
        self.verdicts.append({"target": name, "value": None, "rule": None, "result": "SKIP", "why": why})

    @property
    def missed(self) -> list[str]:
        return [v["target"] for v in self.verdicts if v["result"] == "MISS"]

    def exit_code(self) -> int:
        return MISSED if self.missed else 0
