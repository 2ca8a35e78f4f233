"""The ``peftlab compare`` report: the comparison table, the held-out metrics, the data and
how each column was measured, as Markdown (``report.md``) and as a plain table for the terminal;
and the "Best for" column, earned from the measurements."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def attach_best_for(results: dict[str, Any]) -> None:
    """'Best for' from the measurements: which superlatives each method earned in this run."""
    rows = results["methods"]
    if not rows:
        return
    tags: dict[str, list[str]] = {r["method"]: [] for r in rows}

    def best(key: Callable[[dict[str, Any]], float | None], tag: str, highest: bool) -> None:
        scored: list[tuple[float, str]] = []
        for r in rows:
            value = key(r)
            if value is not None:
                scored.append((float(value), r["method"]))
        if not scored:
            return
        target = max(scored)[0] if highest else min(scored)[0]
        for value, name in scored:
            if math.isclose(value, target, rel_tol=1e-9):
                tags[name].append(tag)

    best(lambda r: r["quality"]["mean"], "highest quality", True)
    best(lambda r: r["trainable_params"], "fewest trainable params", False)
    best(lambda r: r["peak_memory_bytes"], "lowest peak memory", False)
    best(lambda r: r["median_step_s"], "fastest training step", False)
    best(lambda r: r["adapter_file_bytes"], "smallest file", False)
    for r in rows:
        merged = r.get("inference_overhead_merged")
        if r["mergeable"] and merged is not None:
            tags[r["method"]].append("no inference overhead once merged")
        if "composes" in r["traits"]:
            tags[r["method"]].append("stacking tasks (not mergeable)")
        r["best_for"] = ", ".join(tags[r["method"]]) or "-"


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "Method",
        "Trainable params",
        "Adapter file",
        "Peak memory (RSS)",
        "Est. train memory",
        "Step time",
        "Inference vs base (unmerged / merged)",
        f"Quality ({results['task']['metric']})",
        "Best for",
    ]
    rows = []
    for r in results["methods"]:
        q = r["quality"]
        merged = r.get("inference_overhead_merged")
        rows.append(
            [
                r["label"],
                f"{r['trainable_params']:,} ({r['trainable_percent']:.3f}%)",
                _fmt_bytes(r["adapter_file_bytes"]),
                _fmt_bytes(r["peak_memory_bytes"]),
                _fmt_bytes(r["estimated_train_memory_bytes"]["total"]),
                f"{r['median_step_s'] * 1000:.0f} ms",
                f"{r['inference_overhead_unmerged']:.2f}x / " + (f"{merged:.2f}x" if merged else "n/a"),
                f"{q['mean']:.3f} ± {q['std']:.3f}",
                r["best_for"],
            ]
        )
    return header, rows


def _fmt_metric(summary: dict[str, float]) -> str:
    mean, std = summary["mean"], summary["std"]
    if not math.isfinite(mean):
        return str(mean)
    digits = 2 if abs(mean) >= 100 else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every held-out metric per method (mean ± std over seeds), the zero-shot floor first."""
    rows = results["methods"]
    names = list(rows[0].get("metrics", {})) if rows else []
    header = ["Method", *names]
    zs = results["zero_shot"]["metrics"]
    floor = ["zero-shot: " + results["zero_shot"].get("note", "base model")]
    out = [floor + [_fmt_metric({"mean": zs[n], "std": 0.0}) if n in zs else "-" for n in names]]
    for r in rows:
        out.append([r["label"], *(_fmt_metric(r["metrics"][n]) for n in names)])
    return header, out


def _data_lines(task: dict[str, Any]) -> list[str]:
    """What the data was: source, split, labels and every row that did not make it in."""
    info = task.get("data") or {}
    lines = []
    if info:
        lines.append(f"- Source: {info.get('source', task['name'])}; split: {info.get('split', '-')}.")
    counts = info.get("counts")
    if counts:
        lines.append(
            f"- Rows: {counts['rows']:,} ("
            + ", ".join(f"{k} {v:,}" for k, v in counts["categories"].items())
            + f"); dropped {counts['dropped_plot_lines']:,} plot lines and "
            f"{counts['dropped_duplicate_snippets']:,} repeated snippets; "
            f"{counts['snippets']:,} snippets used."
        )
    label_counts = info.get("label_counts")
    if label_counts:
        for part in ("train", "eval"):
            shown = ", ".join(f"{k} {v:,}" for k, v in label_counts[part].items())
            lines.append(f"- Labels in {part}: {shown}.")
    elif task.get("labels"):
        lines.append(f"- Labels: {', '.join(task['labels'])}.")
    for rows in info.get("rows", []):
        line = (
            f"- {rows['source']}: {rows['rows_read']:,} rows read, {rows['rows_used']:,} used, "
            f"{rows['skipped']:,} skipped"
        )
        if rows["skipped"]:
            line += " (first: " + "; ".join(rows["first_problems"]) + ")"
        lines.append(line + ".")
    cut = task.get("truncated_examples") or {}
    if any(cut.values()):
        lines.append(
            f"- Truncated to the max length: {cut.get('train', 0):,} train / "
            f"{cut.get('eval', 0):,} eval examples."
        )
    if task.get("evaluation"):
        lines.append(
            f"- Evaluation: {task['evaluation']}; scored on the first "
            f"{task['eval_examples']:,} eval examples."
        )
    return lines


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    task = results["task"]
    s = results["settings"]
    zs = results["zero_shot"]
    parts = [
        "# peftlab compare",
        "",
        f"Model: {results['model']} · task: {task['name']} ({task['description']}) · "
        f"metric: {task['metric']} on {task['eval_examples']} held-out examples · "
        f"{s['steps']} steps × batch {s['batch_size']} · seeds {s['seeds']}",
        "",
        _markdown_table(header, rows),
        "",
        f"Zero-shot {zs.get('note', 'base model')} (the floor): {task['metric']} = {zs['quality']:.3f}, "
        f"eval loss {zs['eval_loss']:.3f}.",
        "",
        "## Held-out metrics (mean ± std over seeds)",
        "",
        _markdown_table(*metric_rows(results)),
        "",
        "## Data",
        "",
        *_data_lines(task),
        "",
        "How each column was measured: trainable params counted on the adapted model; adapter file = "
        "size of the saved adapter_model.safetensors (full fine-tuning: all weights in fp32); peak "
        "memory = process RSS high-water mark during that method's training (includes the base model "
        "kept for reference); est. train memory = `peftlab count`'s fp32 estimate for this batch and "
        "sequence length; step time = median optimizer step; inference = median forward latency on "
        "one eval batch relative to the untouched base model, timed interleaved; quality = mean ± std "
        "over seeds. Nothing is copied from the lesson.",
        "",
        f"Command: `{results['command']}` · wall time {results.get('wall_s', 0):.0f} s · "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if k != "platform"),
        "",
        "Learning rates: " + ", ".join(f"{r['method']} {r['learning_rate']:g}" for r in results["methods"]),
    ]
    plots = results.get("plots") or [
        "quality_vs_params.png",
        "cost.png",
        "inference_overhead.png",
        "loss_curves.png",
    ]
    parts += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots]]
    return "\n".join(parts) + "\n"


def print_table(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    zs = results["zero_shot"]
    lines.append(
        f"zero-shot ({zs.get('note', 'base model')}): {results['task']['metric']} = {zs['quality']:.3f}"
    )
    m_header, m_rows = metric_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in m_rows)) for i, h in enumerate(m_header)]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(m_header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in m_rows]
    skipped = (results["task"].get("data") or {}).get("skipped_rows")
    if skipped:
        lines.append(f"skipped {skipped} bad rows (reasons in report.md)")
    return "\n".join(lines)
