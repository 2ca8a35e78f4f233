"""How ``peftlab compare`` measures: peak memory from the process's resident-set high-water
mark (reset per run through ``/proc/self/clear_refs``, freed heap returned to the OS first),
latency as medians of interleaved timings, adapter size from the saved files; and one method's
costs (:func:`measure_method`)."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.compare.inputs import ComparisonInputs
from peftlab.core.peft_model import PeftModel, count_parameters
from peftlab.core.quantized import BITS_PER_PARAM
from peftlab.presets import MethodPreset
from peftlab.training.memory import (
    MemoryEstimate,
    activation_assumption,
    memory_estimates,
    quantizable_params,
    quantized_estimate,
)


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


# ---- one method's costs ----------------------------------------------------------------------
def measure_method(
    inputs: ComparisonInputs,
    model: nn.Module,
    peft: PeftModel | None,
    preset: MethodPreset,
    *,
    repeats: int,
    adapter_dir: Path,
) -> dict[str, Any]:
    """Exact counts, the training-memory estimate, the adapter file (saved to ``adapter_dir``)
    and inference latency relative to the base model, merged too where the method merges."""
    model.eval()
    trainable, total = count_parameters(model)
    out: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "estimated_train_memory_bytes": _memory_estimate(inputs, preset, trainable, total).to_dict(),
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


def _memory_estimate(
    inputs: ComparisonInputs, preset: MethodPreset, trainable: int, total: int
) -> MemoryEstimate:
    """As ``peftlab count`` estimates it at the run's batch, length and precision (a quantized
    base: its linear layers at the scheme's bits, as ``count --quantize``)."""
    base = inputs.base
    acts = activation_assumption(base.config, base, inputs.sizes.batch_size, inputs.plan.max_length)
    if preset.quantize is not None:
        bits = BITS_PER_PARAM[(preset.quantize, False)]
        return quantized_estimate(trainable, total, quantizable_params(base), bits, acts)
    return memory_estimates(trainable, total, acts)["bf16" if inputs.precision.mixed else "fp32"]


def _latencies(
    inputs: ComparisonInputs, model: nn.Module, mergeable: PeftModel | None, repeats: int
) -> dict[str, float | None]:
    """Medians of interleaved forward passes over one test batch, against the base: as trained,
    and (``mergeable`` given) with the adapter merged. Full fine-tuning (the model is no
    PeftModel) runs as fast merged as unmerged."""
    base, batch = inputs.base, inputs.latency_inputs()
    base_t, unmerged_t = interleaved_medians([lambda: base(**batch), lambda: model(**batch)], repeats)
    out: dict[str, float | None] = {
        "latency_base_s": base_t,
        "latency_unmerged_s": unmerged_t,
        "inference_overhead_unmerged": unmerged_t / base_t,
    }
    if mergeable is not None:
        mergeable.merge_adapter()
        try:
            base_m, merged_t = interleaved_medians([lambda: base(**batch), lambda: model(**batch)], repeats)
        finally:
            mergeable.unmerge_adapter()
        out["latency_merged_s"] = merged_t
        out["inference_overhead_merged"] = merged_t / base_m
    elif not isinstance(model, PeftModel):
        out["inference_overhead_merged"] = out["inference_overhead_unmerged"]
    else:
        out["inference_overhead_merged"] = None
    return out
