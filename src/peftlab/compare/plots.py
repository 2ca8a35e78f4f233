"""The ``peftlab compare`` plots (matplotlib, the ``compare`` extra): quality vs trainable
parameters, training cost, inference overhead and loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.extras import require


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """PNG plots: quality vs trainable params, training cost, inference overhead, loss curves."""
    matplotlib = require("matplotlib", "peftlab compare's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")(range(len(results["methods"])))
    written: list[str] = []
    for name, draw in (
        ("quality_vs_params.png", _quality),
        ("cost.png", _cost),
        ("inference_overhead.png", _overhead),
        ("loss_curves.png", _losses),
    ):
        fig = draw(plt, results, colors)
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def _quality(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r, c in zip(results["methods"], colors, strict=True):
        x, q = r["trainable_params"], r["quality"]
        ax.errorbar(x, q["mean"], yerr=q["std"], fmt="o", color=c, capsize=4, markersize=8, label=r["method"])
        ax.annotate(r["method"], (x, q["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.axhline(results["zero_shot"]["quality"], color="grey", linestyle="--", label="zero-shot base")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{results['task']['metric']} (held-out)")
    ax.set_title("Quality vs trainable parameters")
    ax.legend(fontsize=8)
    return fig


def _cost(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    rows = results["methods"]
    labels = [r["method"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar(labels, [r["median_step_s"] * 1000 for r in rows], color=colors)
    a1.set_ylabel("median train step (ms)")
    a1.set_title("Training step time")
    peaks = [(r["peak_memory_bytes"] or 0) / 1e9 for r in rows]
    a2.bar(labels, peaks, color=colors, label="measured peak RSS")
    estimates = [r["estimated_train_memory_bytes"]["total"] / 1e9 for r in rows]
    a2.scatter(labels, estimates, color="black", marker="_", s=400, label="estimate (peftlab count)")
    a2.set_ylabel("GB")
    a2.set_title("Peak memory during training")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
    return fig


def _overhead(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    rows = results["methods"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    unmerged = [r["inference_overhead_unmerged"] for r in rows]
    merged = [r["inference_overhead_merged"] or 0 for r in rows]
    ax.bar([x - 0.2 for x in xs], unmerged, width=0.4, label="unmerged")
    ax.bar([x + 0.2 for x in xs], merged, width=0.4, label="merged")
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=30)
    ax.set_ylabel("forward latency / base")
    ax.set_title("Inference overhead vs base model (merged: n/a = 0)")
    ax.legend(fontsize=8)
    return fig


def _losses(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, c in zip(results["methods"], colors, strict=True):
        losses = r["runs"][0]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, color=c, label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Loss curves (seed 0)")
    ax.legend(fontsize=8)
    return fig
