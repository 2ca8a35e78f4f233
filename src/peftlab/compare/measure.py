"""How ``peftlab compare`` measures: peak memory from the process's resident-set high-water
mark (reset per run through ``/proc/self/clear_refs``, freed heap returned to the OS first),
latency as medians of interleaved timings, adapter size from the saved files."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _rss_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so one method's peak RSS does
    not include what an earlier method allocated and freed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    return _rss_status("VmHWM")


def current_rss() -> int | None:
    return _rss_status("VmRSS")


def _time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median time of each fn, measured round-robin so machine noise hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times[i].append(_time_call(fn))
    return [statistics.median(t) for t in times]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def summary(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}
