"""The ``peftlab compare`` report: the comparison table (quality with its 95% bootstrap interval,
methods statistically tied with the best marked), the held-out metrics, the learning-rate
search, where each run stopped, the data and how each column was measured, as Markdown
(``report.md``) and as a plain table for the terminal; and the "Best for" column, earned from
the measurements (quality only from significant differences)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.compare.claims import claim_lines
from peftlab.compare.curves import curve_lines


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

    for r in rows:
        if results.get("best_method") == r["method"]:
            tags[r["method"]].append("highest quality")
        elif r.get("tied_with_best"):
            tags[r["method"]].append("tied for highest quality")
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


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


CONTENDED = "†"  # a timing taken while other work competed for the cores


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "Method",
        "Trainable params",
        "Adapter file",
        "Peak memory (RSS)",
        "Est. train memory",
        "Micro-batch x accum.",
        "Step time (p25-p75)",
        "Inference vs base (unmerged / merged)",
        f"Quality ({results['task']['metric']}, 95% CI)",
        "vs best",
        "Share of full FT's gain",
        "Forgetting (95% CI)",
        "Best for",
    ]
    rows = []
    for r in results["methods"]:
        rows.append(
            [
                r["label"],
                f"{r['trainable_params']:,} ({r['trainable_percent']:.3f}%)",
                _fmt_bytes(r["adapter_file_bytes"]),
                _fmt_bytes(r["peak_memory_bytes"]),
                _fmt_bytes(r["estimated_train_memory_bytes"]["total"]),
                plan_cell(r.get("memory_plan")),
                step_cell(r),
                inference_cell(r),
                quality_cell(r["quality"]),
                versus_best(r, results.get("best_method")),
                interval_cell(r.get("share_of_full_gain"), percent=True),
                interval_cell(r.get("forgetting")),
                r["best_for"],
            ]
        )
    for u in results.get("did_not_fit", []):
        plan = u["memory_plan"]
        cells = ["-"] * len(header)
        cells[0], cells[4], cells[5] = u["label"], _fmt_bytes(plan["needed_bytes"]), "does not fit"
        cells[header.index(next(h for h in header if h.startswith("Quality")))] = u["reason"]
        rows.append(cells)
    return header, rows


def plan_cell(plan: dict[str, Any] | None) -> str:
    """Micro-batch x accumulation (and checkpointing) the method trained with, and a mark when
    it got there by running out of memory."""
    if plan is None:
        return "-"
    text = f"{plan['micro_batch']} x {plan['accumulation']}" + (" + ckpt" if plan["checkpointing"] else "")
    return text + (" (after OOM)" if plan.get("out_of_memory") else "")


def _contended(machine: dict[str, Any] | None) -> str:
    return CONTENDED if machine and machine.get("contended") else ""


def step_cell(row: dict[str, Any]) -> str:
    """Median step time, the middle half of the steps, and a mark when it ran under contention."""
    text = f"{row['median_step_s'] * 1000:.0f} ms"
    spread = row.get("step_spread")
    if spread:
        text += f" ({spread['p25'] * 1000:.0f}-{spread['p75'] * 1000:.0f})"
    return text + _contended(row.get("train_machine"))


def inference_cell(row: dict[str, Any]) -> str:
    merged = row.get("inference_overhead_merged")
    text = f"{row['inference_overhead_unmerged']:.2f}x / " + (f"{merged:.2f}x" if merged else "n/a")
    return text + _contended(row.get("inference_machine"))


def interval_cell(value: dict[str, float] | None, *, percent: bool = False) -> str:
    """``value [low, high]``, or ``-`` where the figure was not measured (or is undefined)."""
    if not value or value["value"] != value["value"]:
        return "-"
    fmt = (lambda x: f"{x:.0%}") if percent else (lambda x: f"{x:+.3f}")
    if value["ci_low"] != value["ci_low"]:
        return fmt(value["value"])
    return f"{fmt(value['value'])} [{fmt(value['ci_low'])}, {fmt(value['ci_high'])}]"


def quality_cell(q: dict[str, float]) -> str:
    """``mean [low, high]`` (and ``± std`` over seeds when there are several)."""
    digits = 2 if abs(q["mean"]) >= 100 else 3
    text = f"{q['mean']:.{digits}f}"
    if "ci_low" in q:
        text += f" [{q['ci_low']:.{digits}f}, {q['ci_high']:.{digits}f}]"
    if q.get("n", 1) > 1:
        text += f" ± {q['std']:.{digits}f}"
    return text


def versus_best(row: dict[str, Any], best: str | None) -> str:
    sig = row.get("significance")
    if row["method"] == best:
        return "best"
    if not sig:
        return "-"
    verdict = "tied" if sig["tied_with_best"] else "worse"
    return f"{verdict} (p={sig['p_value']:.3g}, {sig['test']})"


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
    if task.get("lengths"):
        lines.append(f"- Lengths: {task['lengths']}.")
    for part in (task.get("rows") or {}).values():
        line = (
            f"- {part['part'].capitalize()}: {part['rows']:,} rows, {part['truncated']:,} prompts cut "
            f"from the left, {part['skipped']:,} skipped"
        )
        named = [*part.get("first_truncated", []), *part.get("first_skipped", [])]
        if named:
            line += " (first: " + "; ".join(named) + ")"
        lines.append(line + ".")
    if task.get("evaluation"):
        lines.append(
            f"- Evaluation: {task['evaluation']}; validation on {task.get('validation_examples', 0):,} rows "
            f"carved from the training data, test scores on {task['eval_examples']:,} held-out rows."
        )
    return lines


def search_lines(results: dict[str, Any]) -> list[str]:
    """Per method: the learning rates tried, their validation results, the one chosen."""
    metric = results["task"]["metric"]
    header = [
        "Method",
        "Search",
        "Learning rates tried (best validation loss" + (f", {metric}" if metric else "") + ", state)",
        "Chosen",
    ]
    rows = []
    for r in results["methods"]:
        search = r.get("search") or {}
        trials = search.get("trials") or []
        tried = "; ".join(
            f"{t['learning_rate']:g}: "
            + ("-" if t["val_loss"] is None else f"{t['val_loss']:.4f}")
            + ("" if t.get("val_metric") is None else f", {t['val_metric']:.3f}")
            + ("" if t["state"] == "complete" else f" ({t['state']} at {t['examples']:,} examples)")
            for t in trials
        )
        chosen = f"{r['learning_rate']:g}"
        if r.get("lr_at_edge"):
            chosen += f" (the {r['lr_at_edge']} rate tried: the best may lie beyond it)"
        rows.append([r["label"], str(search.get("effort", "-")), tried or "-", chosen])
    s = results["settings"]
    intro = (
        f"A trial is the first {s['search_budget']:,} training examples of the final run it would be "
        f"(the same schedule over all {s['budget']:,}); successive halving stops the trials that fall "
        "behind, the lowest validation loss wins, and the final run at that rate goes on from its trial."
        if s.get("search") != "none"
        else "No search (--search none): each method trains at its preset's rate, or the one --lr gives."
    )
    return [intro, "", _markdown_table(header, rows)]


def training_lines(results: dict[str, Any]) -> list[str]:
    """The budget and where each final run stopped."""
    s = results["settings"]
    lines = [
        f"Every method trains on the same budget of {s['budget']:,} training examples (batch "
        f"{s['batch_size']}), validated every {s['eval_every']:,} examples; a run stops after "
        f"{s['patience']} validations without a lower loss and is scored with its best validation state.",
        "",
    ]
    header = ["Method", "Seed", "Examples seen", "Best validation at", "Stopped by", "Note"]
    rows = []
    for r in results["methods"]:
        for run in r["runs"]:
            rows.append(
                [
                    r["label"],
                    str(run["seed"]),
                    f"{run['examples_seen']:,}",
                    "-" if run["best_examples"] is None else f"{run['best_examples']:,}",
                    run["stopped"],
                    "still improving at the budget's end" if run.get("still_improving") else "",
                ]
            )
    return [*lines, _markdown_table(header, rows)]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _precision(settings: dict[str, Any]) -> str:
    dtype = settings.get("dtype", "float32")
    where = settings.get("device", "cpu")
    if dtype == "float32":
        return f"{where}, float32"
    return f"{where}, mixed precision ({dtype} autocast and frozen weights, trained weights in float32)"


def _latency_call(results: dict[str, Any]) -> str:
    if results.get("model_kind") == "seq2seq":
        return (
            "latency of greedy generation (the encoder's pass, then every decoding step to the "
            "run's generation length)"
        )
    return "forward latency"


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
        f"budget {s['budget']:,} examples × batch {s['batch_size']} · learning rates: {s['search']} search · "
        f"seeds {s['seeds']} · {_precision(s)}",
        "",
        _markdown_table(header, rows),
        "",
        f"Zero-shot {zs.get('note', 'base model')} (the floor): {task['metric']} = {zs['quality']:.3f}, "
        f"eval loss {zs['eval_loss']:.3f}. Metric: {task.get('metric_rule') or task['metric']}.",
        "",
        *_measurement_notes(results),
        *_section("Data-size curves", curve_lines, results, "curves"),
        *_section("The lesson's claims, checked on this run", claim_lines, results, "claims"),
        "## Held-out metrics (mean ± std over seeds)",
        "",
        _markdown_table(*metric_rows(results)),
        "",
        "## Learning rates (searched on the validation split)",
        "",
        *search_lines(results),
        "",
        "## Training",
        "",
        *training_lines(results),
        "",
        "## Data",
        "",
        *_data_lines(task),
        "",
        "How each column was measured: trainable params counted on the adapted model; adapter file = "
        "size of the saved adapter_model.safetensors (full fine-tuning: all weights in fp32); peak "
        "memory = process RSS high-water mark during that method's training (includes the base model "
        "kept for reference); est. train memory = `peftlab count`'s estimate for this micro-batch, "
        "sequence length and precision; micro-batch x accum. = the memory plan the method trained "
        "with: each batch in forward passes of that many examples, their gradients accumulated (the "
        "same examples per optimizer step for every method), + ckpt = activation checkpointing, "
        "(after OOM) = reached after running out of memory; step time = median optimizer step; "
        f"inference = median {_latency_call(results)} on "
        "one eval batch relative to the untouched base model, timed interleaved; quality on the "
        "held-out test split with a 95% percentile-bootstrap interval over its examples (1,000 "
        "resamples); vs best = a paired test against the best method on the same test examples "
        "(exact McNemar for 0/1 scores with one seed, else a paired bootstrap), tied when p >= 0.05. "
        "Nothing is copied from the lesson.",
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


def _section(
    title: str, lines: Callable[[dict[str, Any]], list[str]], results: dict[str, Any], key: str
) -> list[str]:
    return [f"## {title}", "", *lines(results), ""] if results.get(key) else []


def _measurement_notes(results: dict[str, Any]) -> list[str]:
    """What forgetting measured and which timings were taken under contention."""
    notes = []
    retain = results.get("retain")
    if retain:
        measure = (
            "the change in mean token loss (nats per token, tuned minus base)"
            if retain["kind"] == "loss"
            else "1 - the mean cosine similarity of the tuned and the base model's pooled sentence embeddings"
        )
        notes.append(
            f"Forgetting: {measure} on {retain['source']}, with a 95% bootstrap interval over passages; "
            "the untouched base scores 0 by construction."
        )
    else:
        notes.append("Forgetting: not measured (--retain-data none).")
    if any(CONTENDED in c for row in table_rows(results)[1] for c in row):
        notes.append(
            f"{CONTENDED} timed while other work used more than a tenth of the machine's CPU time: that "
            "timing cannot be trusted (rerun alone on the machine)."
        )
    return [*notes, ""]


def render_table(results: dict[str, Any]) -> str:
    """The comparison table and the metric table as plain text, for the terminal."""
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
