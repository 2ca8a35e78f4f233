"""How ``peftlab compare`` measures: peak memory from the process's resident-set high-water
mark (reset per run through ``/proc/self/clear_refs``, freed heap returned to the OS first),
latency as medians of interleaved timings, adapter size from the saved files; and one method's
costs (:func:`measure_method`)."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.compare.inputs import ComparisonInputs
from peftlab.core.injection import wrapped_modules
from peftlab.core.peft_model import PeftModel, count_parameters
from peftlab.core.quantized import BITS_PER_PARAM
from peftlab.presets import MethodPreset
from peftlab.training.memory import MemoryEstimate, MemoryPlan, training_estimate


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


def interleaved_times(
    fns: Sequence[Callable[[], Any]], repeats: int, before: Sequence[Callable[[], Any]] | None = None
) -> list[list[float]]:
    """Every time of each fn, measured round-robin so machine noise hits all alike;
    ``before[i]`` (untimed) runs before each call of ``fns[i]``."""
    setups = before or [lambda: None] * len(fns)
    for setup, fn in zip(setups, fns, strict=True):
        setup()
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            setups[i]()
            times[i].append(_time_call(fn))
    return times


def interleaved_medians(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median time of each fn, measured round-robin (:func:`interleaved_times`)."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats)]


def ratio_spread(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """The paired per-repeat ratios of two interleaved timings: median, quartiles, range."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    q1, q3 = (float(np.quantile(ratios, q)) for q in (0.25, 0.75))
    return {"median": statistics.median(ratios), "p25": q1, "p75": q3, "min": ratios[0], "max": ratios[-1]}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of repeated timings."""
    ordered = sorted(values)
    q1, q3 = (float(np.quantile(ordered, q)) for q in (0.25, 0.75))
    return {"median": statistics.median(ordered), "p25": q1, "p75": q3, "min": ordered[0], "max": ordered[-1]}


# ---- competing work on the machine --------------------------------------------------------------
# more than this share of the machine's CPU time used by other processes while a timing was taken,
# and the timing is marked as measured under contention
CONTENDED_SHARE = 0.10


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_jiffies() -> int | None:
    """CPU time of this process so far (user + system, ``/proc/self/stat``)."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(after_name[11]) + int(after_name[12])


def worst(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The more contended of two :meth:`Contention.stop` readings of one run's parts."""
    if a is None:
        return b
    share = max((x for x in (a["other_cpu_share"], b["other_cpu_share"]) if x is not None), default=None)
    return {
        **b,
        "other_cpu_share": share,
        "max_load_1m": max(a["max_load_1m"], b["max_load_1m"]),
        "contended": a["contended"] or b["contended"],
    }


class Contention:
    """How much of the machine other processes used between :meth:`start` and :meth:`stop`, and
    the highest 1-minute load average seen: what says whether a timing can be trusted."""

    def __init__(self) -> None:
        self.machine: tuple[int, int] | None = None
        self.own: int | None = None
        self.max_load = 0.0

    def start(self) -> Contention:
        self.machine, self.own = _cpu_jiffies(), _own_jiffies()
        self.sample()
        return self

    def sample(self) -> None:
        """Note the load average now (called during the work, e.g. at each validation)."""
        if hasattr(os, "getloadavg"):
            self.max_load = max(self.max_load, os.getloadavg()[0])

    def stop(self) -> dict[str, Any]:
        self.sample()
        machine, own = _cpu_jiffies(), _own_jiffies()
        share = None
        if None not in (machine, own, self.machine, self.own):
            assert (
                machine is not None and self.machine is not None and own is not None and self.own is not None
            )
            busy, total = machine[0] - self.machine[0], machine[1] - self.machine[1]
            share = max(0.0, (busy - (own - self.own)) / total) if total > 0 else 0.0
        return {
            "other_cpu_share": share,
            "max_load_1m": round(self.max_load, 2),
            "cpu_count": os.cpu_count(),
            "contended": share is not None and share > CONTENDED_SHARE,
        }


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def summary(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


# ---- one method's costs ----------------------------------------------------------------------
def measure_method(
    inputs: ComparisonInputs,
    model: nn.Module,
    peft: PeftModel | None,
    preset: MethodPreset,
    *,
    repeats: int,
    adapter_dir: Path,
    plan: MemoryPlan | None = None,
) -> dict[str, Any]:
    """Exact counts, the training-memory estimate (at the micro-batch and checkpointing of the
    method's memory plan), the adapter file (saved to ``adapter_dir``) and inference latency
    relative to the base model, merged too where the method merges."""
    model.eval()
    trainable, total = count_parameters(model)
    estimate = method_estimate(
        inputs,
        preset,
        trainable,
        total,
        micro_batch=None if plan is None else plan.micro_batch,
        checkpointing=plan is not None and plan.checkpointing,
    )
    out: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "estimated_train_memory_bytes": estimate.to_dict(),
        "mergeable": preset.mergeable,
        "config": peft.peft_config["default"].to_dict() if peft is not None else None,
    }
    if peft is not None:
        peft.save_pretrained(adapter_dir)
        out["adapter_file_bytes"] = dir_size(adapter_dir)
        out["adapter_path"] = str(adapter_dir)
    else:
        out["adapter_file_bytes"] = trainable * 4  # a full checkpoint in fp32
    with torch.no_grad(), inputs.precision.autocast():
        out.update(_latencies(inputs, model, peft if preset.mergeable else None, repeats))
    model.train()
    return out


def method_estimate(
    inputs: ComparisonInputs,
    preset: MethodPreset,
    trainable: int,
    total: int,
    *,
    micro_batch: int | None = None,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """As ``peftlab count`` estimates it at the run's lengths and precision, per forward pass of
    ``micro_batch`` examples (default the whole batch), with or without activation
    checkpointing (a quantized base: its linear layers at the scheme's bits, as ``count
    --quantize``)."""
    batch = inputs.sizes.batch_size if micro_batch is None else micro_batch
    bits = None if preset.quantize is None else BITS_PER_PARAM[(preset.quantize, False)]
    return training_estimate(
        inputs.base,
        trainable,
        total,
        batch,
        inputs.plan.max_length,
        mixed=inputs.precision.mixed,
        bits=bits,
        checkpointing=checkpointing,
    )


def _latencies(
    inputs: ComparisonInputs, model: nn.Module, mergeable: PeftModel | None, repeats: int
) -> dict[str, Any]:
    """Interleaved forward passes (an encoder-decoder's: generation, see
    :meth:`ComparisonInputs.inference`) over one test batch against the base: as trained, and
    (``mergeable`` given) with the adapter merged; medians, the paired ratios' spread over the
    repeats, and the other work on the machine meanwhile. An adapter in the shared base is set
    aside for the base's timings (:meth:`PeftModel.detach`), so the base runs exactly as loaded.
    Full fine-tuning (the model is no PeftModel) runs as fast merged as unmerged."""
    base, batch = inputs.base, inputs.latency_inputs()
    peft = model if isinstance(model, PeftModel) else None
    around = [peft.detach, peft.attach] if peft is not None else None
    watch = Contention().start()
    run_base, run_model = inputs.inference(base, batch), inputs.inference(model, batch)
    base_t, unmerged_t = interleaved_times([run_base, run_model], repeats, around)
    out: dict[str, Any] = {
        "latency_base_s": statistics.median(base_t),
        "latency_unmerged_s": statistics.median(unmerged_t),
        "inference_overhead_unmerged": statistics.median(unmerged_t) / statistics.median(base_t),
        "inference_spread_unmerged": ratio_spread(unmerged_t, base_t),
    }
    if mergeable is not None:
        with weights_kept(mergeable):
            mergeable.merge_adapter()
            # the base's timings run its plain modules over the merged weights: the same work
            base_m, merged_t = interleaved_times([run_base, run_model], repeats, around)
            mergeable.unmerge_adapter()
        out["latency_merged_s"] = statistics.median(merged_t)
        out["inference_overhead_merged"] = statistics.median(merged_t) / statistics.median(base_m)
        out["inference_spread_merged"] = ratio_spread(merged_t, base_m)
    elif peft is None:
        out["inference_overhead_merged"] = out["inference_overhead_unmerged"]
        out["inference_spread_merged"] = out["inference_spread_unmerged"]
    else:
        out["inference_overhead_merged"] = None
    out["inference_machine"] = watch.stop()
    return out


@contextlib.contextmanager
def weights_kept(peft: PeftModel) -> Iterator[None]:
    """The adapted modules' base weights copied before and put back after the block, bit for bit:
    unmerging subtracts what merging added, which is exact only up to rounding, and the base is
    shared with every other method. A merged model computes with the base's weights replaced, so
    its forward is the base's (what the merged latency measures)."""
    kept = [
        (t, t.detach().clone())
        for _, module in wrapped_modules(peft.base_model)
        for t in (getattr(module.base_layer, "weight", None), getattr(module.base_layer, "bias", None))
        if isinstance(t, torch.Tensor)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in kept:
                tensor.copy_(copy)
